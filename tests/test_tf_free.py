"""The core runs without TensorFlow ([8] item 5): a GPU box with only JAX can train and bench.

Each check runs in a fresh interpreter whose import system refuses tensorflow and
tensorflow_datasets, so any core module that imports them (directly or through another
module) fails the check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests import xla_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ("vqt_jax.models", "vqt_jax.cache", "vqt_jax.costs", "vqt_jax.device_cache",
        "vqt_jax.sampling", "vqt_jax.methods", "vqt_jax.checkpoints", "vqt_jax.training.train_step",
        "vqt_jax.training.optim", "vqt_jax.training.engine", "vqt_jax.training.mesh")
BLOCK_TF = """
import sys
class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
            raise ImportError(f"{name} is blocked: the core must not need TensorFlow")
sys.meta_path.insert(0, _NoTensorFlow())
"""


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TF + code], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)


def test_core_modules_import_without_tensorflow():
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in CORE)
    code += "print(sorted(m for m in sys.modules if m.startswith('tensorflow')))\n"
    proc = _python(code)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_pipeline_does_need_tensorflow():
    """The blocker works: the input pipeline, which does need TensorFlow, fails under it."""
    proc = _python("import vqt_jax.data\n")
    assert proc.returncode != 0 and "blocked" in proc.stdout


def test_accelerator_bench_tiny_runs_without_tensorflow(tmp_path):
    out = tmp_path / "bench.json"
    env = xla_env.env(None)  # one device, as a GPU box
    proc = _python(
        "import runpy\n"
        f"sys.argv = ['accelerator_bench.py', '--tiny', '--json', {str(out)!r}]\n"
        "runpy.run_path('experiments/accelerator_bench.py', run_name='__main__')\n", env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] and r["batch"] == 8
    for dtype in ("float32", "bfloat16"):
        assert r["forward"][dtype]["img_s"] > 0 and r["forward"][dtype]["gflops_per_image"] > 0
    assert r["vqt_uncached"]["step_img_s"] > 0 and r["vqt_cached"]["step_img_s"] > 0
    assert r["epoch"]["steps"] == 8 and r["epoch"]["speedup"] > 0
    # Full fine-tuning keeps gradients and Adam moments for every parameter: more memory.
    assert (r["memory"]["full_finetune_step"]["total_bytes"]
            > r["memory"]["vqt_step"]["total_bytes"] > 0)
    # A protocol stage's training: one run (a stack of one) against the stacked programs.
    stage = r["stage_training"]
    assert stage["batch"] == 8 and stage["steps_per_epoch"] == 8 and "partial" not in r
    assert stage["one_run"]["epoch_s"] > 0
    assert (stage["grid"]["members"], stage["grid"]["example_orders"]) == (20, 1)
    assert (stage["seeds"]["members"], stage["seeds"]["example_orders"]) == (5, 5)
    assert stage["gflops_per_run_step"] > 0 and r["gflops_per_image_cpu_count"] > 0
    for name in ("grid", "seeds"):
        assert stage[name]["epoch_s"] > 0 and stage[name]["stage_one_program_s"] > 0
        assert stage[name]["achieved_tflop_s"] > 0
