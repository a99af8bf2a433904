"""Altered exports (`model.vqt`): predict.py refuses each with one `error:` line naming the file
and the field or array, before any model is built."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from tests import train_utils
from vqt_jax import export, resolve, trainable
from vqt_jax.training import train


def _write(path, change=None, nan=False) -> str:
    """A valid export of a tiny VQT model of zeros (its meta changed by `change(meta)`, its
    head NaN with `nan`) at `path`."""
    config = resolve.resolve(train_utils.tiny_config(data_dir="/nowhere"))  # as a run exports it
    abstract = train.abstract_variables(train.build_model(config, 3), config)
    arrays = {k: np.zeros(a.shape, a.dtype) for k, a in trainable.flatten(abstract).items()}
    if nan:
        arrays["params/head/kernel"] = arrays["params/head/kernel"] + np.nan
    export.write(str(path), config=config, variables={}, provided=frozenset(), class_names=[])
    meta = json.loads(np.load(path)[export.META].tobytes())
    meta["class_names"] = ["a", "b", "c"]
    if change is not None:
        meta = change(meta) or meta
    with open(path, "wb") as f:
        np.savez(f, **{export.META: np.frombuffer(json.dumps(meta).encode(), np.uint8)}, **arrays)
    return str(path)


CASES = {  # name -> (change(meta), NaN head, error regex)
    "backbone deleted": (lambda m: m.pop("backbone") and None, False,
                         r"has no field 'backbone'"),
    "config.model deleted": (lambda m: m["config"].pop("model") and None, False,
                             r"has no field 'config\.model'"),
    "meta a list": (lambda m: [m], False, r"meta\.json holds a JSON list, not an object"),
    "image_size a string": (lambda m: m["config"].update(image_size="abc"), False,
                            r"field 'config\.image_size' is 'abc', not int"),
    "unknown variant": (lambda m: m["config"]["model"].update(variant="Q/7"), False,
                        r"the config in its meta\.json cannot rebuild the model \(.*Q/7"),
    "NaN head": (None, True, r"1 array\(s\) hold NaN or inf values, e\.g\. "
                                    r"params/head/kernel"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_an_altered_export_is_one_error_naming_the_file_and_field(name, tmp_path, capsys):
    import predict

    change, nan, pattern = CASES[name]
    path = _write(tmp_path / "model.vqt", change, nan)
    image = os.path.join(train_utils.make_image_folder(tmp_path / "data"), "test", "class0")
    assert predict.run(["--model", path, image]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {path}: "), err
    assert re.search(pattern, err[0]), err[0]


def test_a_valid_export_reads(tmp_path):
    assert export.read(_write(tmp_path / "model.vqt")).class_names == ["a", "b", "c"]
