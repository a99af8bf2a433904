"""predict.py's --output: checked before anything is classified, named in every error (never
its temporary file), and no temporary file left behind by a failure."""

from __future__ import annotations

import errno
import os
import re

import pytest

from tests import train_utils
from tests.test_export_faults import _write
from vqt_jax import serving


@pytest.fixture
def setup(tmp_path):
    model = _write(tmp_path / "model.vqt")
    images = os.path.join(train_utils.make_image_folder(tmp_path / "data"), "test", "class0")
    out = tmp_path / "out"
    out.mkdir()
    return model, images, out


def _run(argv, capsys) -> str:
    import predict

    assert predict.run(argv) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("target, pattern", [
    ("dir.csv", r"--output .*/out/dir\.csv is a directory: name a \.csv or \.jsonl file"),
    ("missing/p.csv", r"--output .*/missing/p\.csv: the directory .*/missing does not exist"),
])
def test_a_bad_output_path_stops_before_classifying(setup, target, pattern, monkeypatch,
                                                    capsys):
    model, images, out = setup
    (out / "dir.csv").mkdir()

    def never(*args, **kwargs):
        raise AssertionError("classified before the output path was checked")

    monkeypatch.setattr(serving, "Predictor", never)
    assert re.search(pattern, _run(["--model", model, "--output", str(out / target), images],
                                   capsys))
    assert os.listdir(out) == ["dir.csv"]


def test_a_failed_write_names_the_output_and_leaves_no_temporary_file(setup, monkeypatch,
                                                                      capsys):
    """A rename that fails (a read-only target) names --output, not the temporary file, and
    the temporary file is removed; a dead process's temporary file is removed too."""
    model, images, out = setup
    target = str(out / "p.csv")
    (out / "p.csv.tmp-999999999").write_text("partial")

    def read_only(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), src)

    monkeypatch.setattr(os, "replace", read_only)
    line = _run(["--model", model, "--output", target, images], capsys)
    assert line == f"error: cannot write --output {target}: Read-only file system", line
    assert os.listdir(out) == []
