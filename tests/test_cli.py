"""main.py's command line: README's commands, exactly as README shows them, and usage errors.

The commands are read out of README.md (its first two lines and its Commands section), so a
README line that stops working fails here: every main.py line goes through main.py's own flag
parsing and `--dry_run` checks (config, data, checkpoint, workdir; nothing compiled or
written); every experiments/ line through its script's argument parser.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex

import pytest
import tensorflow_datasets as tfds

from tests import train_utils
from tests.scripts import load_script
from tests.test_data import _fake_prepare
from vqt_jax import cli
from vqt_jax.training import train

REPO = pathlib.Path(__file__).resolve().parent.parent
README = REPO / "README.md"


def _readme_lines() -> list[tuple[str, str]]:
    """(where, command) for README's first two lines and every line of its Commands block."""
    text = README.read_text()
    lines = text.splitlines()
    out = [("line 1", lines[0]), ("line 2", lines[1])]
    block = text.split("## Commands", 1)[1].split("```", 2)[1]
    out += [(f"Commands: {line.split()[1]}", line) for line in block.strip().splitlines()
            if line.strip()]
    return out


def _args(command: str) -> list[str]:
    """The words of one command: comments dropped, optional [--flag] groups kept as flags."""
    command = re.sub(r"\s{2,}#.*$", "", command)
    command = command.replace("[", " ").replace("]", " ")
    return shlex.split(command)


def _python_part(line: str) -> str:
    """The `python ...` step of a set-up line (`a && b && python main.py ...`)."""
    steps = [s.strip() for s in line.split("&&")]
    python = [s for s in steps if s.startswith("python ")]
    return python[-1] if python else ""


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory):
    """Values for README's placeholders: a tiny image folder, a prepared-looking TFDS dir."""
    root = tmp_path_factory.mktemp("readme")
    folder = train_utils.make_image_folder(root / "folder", size=16)
    tfds_dir = str(root / "tfds")
    _fake_prepare(tfds_dir, "dtd:3.*.*", {"train": 1880, "validation": 1880, "test": 1880})
    return {"TASK": "dtd", "ROOT": folder, "DIR": str(root / "work"),
            "SWEEP": str(root / "sweep"), "JSON": str(root / "memory.json"),
            "PATH": str(root / "out.json"), "tfds_dir": tfds_dir}


def _substitute(args: list[str], values: dict[str, str]) -> list[str]:
    def sub(arg: str) -> str:
        for name in ("TASK", "ROOT", "DIR", "SWEEP", "JSON", "PATH"):
            arg = re.sub(rf"(?<![A-Za-z_]){name}(?![A-Za-z_])", values[name], arg)
        return arg

    return [sub(a) for a in args]


def _dry_run(args: list[str], monkeypatch, values) -> train.RunPlan:
    assert args[:2] == ["python", "main.py"], args
    options = cli.parse(["main.py", *args[2:]])
    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", values["tfds_dir"])
    with tfds.testing.mock_data(num_examples=16, data_dir=values["tfds_dir"]):
        return train.plan_run(options.config, options.workdir, dry_run=True)


READMES = _readme_lines()


def test_readme_shows_the_commands_this_test_checks():
    names = [where for where, _ in READMES]
    assert "Commands: main.py" in names and "Commands: experiments/vtab_sweep.py" in names
    assert "python main.py --config=configs/demo.py" in READMES[0][1]
    assert "pytest" in READMES[1][1] and "requirements-dev.txt" in READMES[1][1]


@pytest.mark.parametrize("where, line", READMES, ids=[w for w, _ in READMES])
def test_readme_command_runs_as_written(where, line, placeholders, tmp_path, monkeypatch):
    monkeypatch.setenv("VQT_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(REPO)
    if where == "line 2":
        # The test line itself: CI runs it verbatim (.ci/run); its python step is pytest.
        last = line.split("&&")[-1].strip()
        assert last.startswith("XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m "
                               "pytest"), last
        return
    command = _python_part(line) if where == "line 1" else line
    args = _substitute(_args(command), placeholders)
    # README's literal workdirs (/tmp/vqt/demo) may hold a real run on this machine: check the
    # command against a fresh directory instead.
    args = [f"--workdir={tmp_path / 'work'}" if a.startswith("--workdir=") else a for a in args]
    script = args[1]
    if script == "main.py":
        plan = _dry_run(args, monkeypatch, placeholders)
        assert plan.num_train > 0 and plan.num_eval > 0
        workdir = args[[a.startswith("--workdir=") for a in args].index(True)].split("=", 1)[1]
        assert not os.path.exists(workdir)  # a dry run writes nothing
        return
    name = pathlib.Path(script).stem
    if name == "predict":  # at the repository's root, beside main.py
        import predict

        predict.parser().parse_args(args[2:])
        return
    module = load_script(name)
    rest = args[2:]
    if name == "vtab_sweep":
        parsed = module._parser().parse_args(rest)
        assert parsed.tasks and parsed.workdir
    elif name == "plot":
        module.parse_flags(["plot.py", *rest])
    elif name in ("memory", "cache_speed", "accelerator_bench", "cpu_forward_vs_timm",
                  "sweep_speed", "serve_speed"):
        module.parser().parse_args(rest)
    else:
        pytest.fail(f"README shows {script}, which this test does not know how to check")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config.lrr=0.1"], r"^error: config\.lrr: the config has no such field \(Did you "
                               r"mean \"lr\""),
        (["--config.model.num_querie=2"], r"^error: config\.model\.num_querie: the config has "
                                          r"no such field"),
        (["--config.lr=abc"], r"^error: flag --config\.lr=abc: could not convert"),
        (["--bogus=1"], r"^error: Unknown command line flag 'bogus'"),
        (["--config=configs/nope.py"], r"^error: cannot load --config=configs/nope\.py: .*No "
                                       r"such file"),
    ],
    ids=["misspelled field", "misspelled nested field", "bad value", "unknown flag",
         "missing config file"],
)
def test_usage_errors_are_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    workdir = tmp_path / "wd"
    code = cli.run(["main.py", "--config=configs/vtab.py:dtd", f"--workdir={workdir}", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not workdir.exists()


def test_data_dir_override_reaches_the_config(placeholders, monkeypatch):
    """The README bug: --config.data_dir on a None field could not be overridden at all."""
    monkeypatch.chdir(REPO)
    options = cli.parse(["main.py", "--config=configs/vtab.py:folder",
                         f"--config.data_dir={placeholders['ROOT']}", "--workdir=/tmp/x"])
    assert options.config.data_dir == placeholders["ROOT"]


def test_lower_lr_command_replaces_or_appends():
    assert cli.lower_lr_command(["main.py", "--config=c.py", "--config.lr=1.0"], 0.1) == (
        "python main.py --config=c.py --config.lr=0.1")
    assert cli.lower_lr_command(["main.py", "--config=c.py:a b", "--config.lr", "2"], 0.2) == (
        "python main.py '--config=c.py:a b' --config.lr=0.2")
    assert cli.lower_lr_command(["main.py", "--workdir=/w"], 1e-3) == (
        "python main.py --workdir=/w --config.lr=0.001")
