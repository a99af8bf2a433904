"""Runs notebooks/colab_tpu.ipynb end to end on CPU in its offline TINY mode."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import nbclient
import nbformat

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "notebooks" / "colab_tpu.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def _parameters_cell(nb):
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    return tagged[0]


def _parameter_names(source: str) -> set[str]:
    return {line.split("=")[0].strip() for line in source.splitlines()
            if "=" in line and not line.startswith((" ", "#"))}


def _write_sweep(directory: Path) -> Path:
    # A results.csv from vtab_sweep.py's own writer (a sweep itself needs VTAB data).
    spec = importlib.util.spec_from_file_location(
        "vtab_sweep", REPO_ROOT / "experiments" / "vtab_sweep.py")
    sweep = sys.modules.get("vtab_sweep")
    if sweep is None:
        sweep = importlib.util.module_from_spec(spec)
        sys.modules["vtab_sweep"] = sweep
        spec.loader.exec_module(sweep)
    sweep.write_reports([
        sweep.TaskResult("dtd", "natural", 0.125, 1e-3, 0.70, (0.71, 0.72)),
        sweep.TaskResult("eurosat", "specialized", 0.25, 0.0, 0.95, (0.94, 0.95)),
    ], directory)
    return directory


def test_parameters_cell_comes_right_after_the_install_and_holds_the_knobs():
    nb = _load_notebook()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[1] is _parameters_cell(nb)
    names = _parameter_names(code[1].source)
    assert {"TASK", "VARIANT", "INIT", "EPOCHS", "WORKDIR", "DATA_DIR", "TINY"} <= names
    assert "TINY = False" in code[1].source
    assert "ViT-B_16.npz" in code[1].source


def test_notebook_runs_offline_in_tiny_mode(tmp_path):
    nb = _load_notebook()
    params = _parameters_cell(nb)
    workdir = tmp_path / "run"
    sweep = _write_sweep(tmp_path / "sweep")
    # Override after the defaults, as papermill's injected cell would.
    params.source += (
        f"\n\n# Injected by tests/test_notebook.py\nTINY = True\nWORKDIR = {str(workdir)!r}\n"
        f"SWEEP_DIR = {str(sweep)!r}\nNUM_PLOT_IMAGES = 3\n"
    )
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        # TINY must not touch the network: any pip or HTTP(S) access fails at once.
        PIP_NO_INDEX="1", HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
        http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
        VQT_JAX_CACHE=str(tmp_path / "cache"), TFDS_DATA_DIR=str(tmp_path / "tfds"),
        MPLBACKEND="module://matplotlib_inline.backend_inline",
    )
    client = nbclient.NotebookClient(
        nb, timeout=240, kernel_name="python3", allow_errors=False,
        resources={"metadata": {"path": str(REPO_ROOT)}},  # the kernel's cwd
    )
    client.execute(env=env)  # raises CellExecutionError on the first failing cell

    for cell in nb.cells:
        if cell.cell_type == "code":
            assert all(o.get("output_type") != "error" for o in cell.get("outputs", []))
    results = json.loads((workdir / "results.json").read_text())
    assert results["task"] == "folder" and results["method"] == "vqt"
    assert results["num_eval_examples"] == 15
    for name in ("query_attention.png", "sweep_accuracy.png", "memory.png"):
        blob = (workdir / "plots" / name).read_bytes()
        assert blob[:8] == PNG_MAGIC and len(blob) > 5000, name
    # The figures are shown in the notebook, not only written.
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if "image/png" in o.get("data", {})]
    assert len(shown) >= 4  # the loss curve and the three figures
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "device(s)" in text and "TINY: image folder" in text
