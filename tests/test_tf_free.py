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
import textwrap

import numpy as np
import pytest

from tests import xla_env
from tests.test_data import _fake_prepare, prepare_tiny_vtab
from tests.train_utils import make_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ("vqt_jax.models", "vqt_jax.cache", "vqt_jax.costs", "vqt_jax.device_cache",
        "vqt_jax.sampling", "vqt_jax.methods", "vqt_jax.checkpoints", "vqt_jax.training.train_step",
        "vqt_jax.training.optim", "vqt_jax.training.engine", "vqt_jax.training.mesh",
        "vqt_jax.data", "vqt_jax.data.content", "vqt_jax.data.fashion_mnist")
BLOCK_TF = """
import sys
class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
            raise ImportError(f"{name} is blocked: the core must not need TensorFlow")
sys.meta_path.insert(0, _NoTensorFlow())
"""


def _python(code: str, env: dict | None = None,
            block: str = BLOCK_TF) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", block + code], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)


def test_core_modules_import_without_tensorflow():
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in CORE)
    code += "print(sorted(m for m in sys.modules if m.startswith('tensorflow')))\n"
    proc = _python(code)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_blocker_blocks():
    """The blocker works: importing TensorFlow fails under it."""
    proc = _python("import tensorflow\n")
    assert proc.returncode != 0 and "blocked" in proc.stdout


# TensorFlow as if not installed (no module; importlib.util.find_spec, which etils.epath asks,
# gives None); tensorflow_datasets loads: it reads ArrayRecord files without TensorFlow.
BLOCK_ONLY_TF = """
import sys
from importlib.machinery import PathFinder
_find = PathFinder.find_spec
PathFinder.find_spec = classmethod(
    lambda cls, name, path=None, target=None:
    None if name.split(".")[0] == "tensorflow" else _find(name, path, target))
"""


def test_data_pipelines_run_without_tensorflow(tmp_path):
    """An image folder's training, evaluation (host 1 of 2), cache-build and predict batches,
    its cache key, and TFDS tasks' training and evaluation, in a process that cannot import
    TensorFlow; the folder's evaluation images equal TensorFlow's decode, `tf.image.resize` and
    normalization. One TFDS task reads `tfds.testing.mock_data`'s `as_data_source`, given the
    examples (PNG-encoded by PIL): the mock's own fake examples encode images with TensorFlow;
    another reads real ArrayRecord files (prepared here, with TensorFlow)."""
    tf = pytest.importorskip("tensorflow")
    root = make_image_folder(tmp_path / "images", size=13)
    tfds_dir = str(tmp_path / "tfds")
    _fake_prepare(tfds_dir, "dtd:3.*.*")
    tiny_dir = str(tmp_path / "tiny")
    prepare_tiny_vtab(tiny_dir)
    out = tmp_path / "out.npz"
    code = textwrap.dedent(f"""
        import numpy as np
        import tensorflow_datasets as tfds
        from vqt_jax import data
        from tests.test_data import _png, tiny_task
        from vqt_jax.data import content, folder
        root, tfds_dir, tiny_dir = {root!r}, {tfds_dir!r}, {tiny_dir!r}

        def source(builder, split, decoders=None, **kwargs):
            assert isinstance(decoders["image"], tfds.decode.SkipDecoding)
            pixels = np.random.default_rng(0).integers(0, 256, (5, 9, 7, 3), np.uint8)
            return [dict(image=_png(x), label=np.int64(i), file_name=str(i))
                    for i, x in enumerate(pixels)]

        hosts = dict(process_index=0, process_count=1)
        data.validate("folder", root, "val")
        train = data.make_train_iterator("folder", root, "val", global_batch_size=4,
                                         image_size=16, **hosts)
        train = [next(train) for _ in range(3)]
        evals = list(data.make_eval_iterator("folder", root, "val", global_batch_size=4,
                                             image_size=16, process_index=1, process_count=2))
        images, labels = data.load_train_examples("folder", root, "val", image_size=16)
        paths = list(folder.listing(root, "val", "eval").paths)
        predict = np.concatenate([x for _, x in data.file_batches(paths, batch_size=5,
                                                                  image_size=16)])
        assert content.content_key("folder", root, "val")["num_files"] == 24
        with tfds.testing.mock_data(data_dir=tfds_dir, as_data_source_fn=source):
            data.validate("dtd", tfds_dir, "val")
            tfds_train = next(data.make_train_iterator("dtd", tfds_dir, "val",
                                                       global_batch_size=2, image_size=8, **hosts))
            tfds_eval = list(data.make_eval_iterator("dtd", tfds_dir, "test", global_batch_size=2,
                                                     image_size=8, **hosts))
        data.TASKS["dtd"] = tiny_task()  # Real ArrayRecord files.
        data.validate("dtd", tiny_dir, "test")
        tiny_images, tiny_labels = data.load_train_examples("dtd", tiny_dir, "test", image_size=4)
        assert len(tiny_labels) == 7 and (tiny_images[:, 0, 0, 0] == tiny_labels).all()
        assert sum(b["mask"].sum() for b in data.make_eval_iterator(
            "dtd", tiny_dir, "test", global_batch_size=4, image_size=4, **hosts)) == 7
        assert tfds_train["image"].shape == (2, 8, 8, 3)
        assert sum(b["mask"].sum() for b in tfds_eval) == 5
        np.savez({str(out)!r}, train=np.stack([b["image"] for b in train]),
                 evals=np.stack([b["image"] for b in evals]),
                 eval_mask=np.stack([b["mask"] for b in evals]), images=images, predict=predict)
        print(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))
    """)
    proc = _python(code, block=BLOCK_ONLY_TF)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    got = np.load(out)
    assert got["train"].shape == (3, 4, 16, 16, 3) and got["images"].shape == (24, 16, 16, 3)

    def reference(path):  # The TensorFlow pipeline's evaluation image.
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        resized = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(image, [16, 16])), 0, 255),
                          tf.uint8)
        return ((tf.cast(resized, tf.float32) - 127.5) / 127.5).numpy()

    paths = sorted(str(p) for p in (tmp_path / "images" / "val").glob("*/*.png"))
    expected = np.stack([reference(p) for p in paths])
    np.testing.assert_array_equal(got["predict"], expected)
    host1 = got["evals"].reshape(-1, 16, 16, 3)[got["eval_mask"].ravel() == 1]
    np.testing.assert_array_equal(host1, expected[1::2])


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


# gs:// through epath's fsspec backend (what it uses without TensorFlow), gcsfs replaced by a
# local file system rooted at GCS_ROOT: nothing reaches the network.
FAKE_GCS = "from tests.fake_gcs import register\nregister(GCS_ROOT)\n"


def test_a_run_predict_and_gs_files_without_tensorflow(tmp_path):
    """Without TensorFlow: main.py's entry trains and evaluates a tiny image-folder run (cache
    on, a linear baseline) and writes results.json, metrics.jsonl and a TensorBoard event file;
    predict.py classifies with its model.vqt; a gs:// checkpoint is read and a gs:// workdir's
    metrics are written through epath's fsspec backend (gcsfs faked)."""
    folder = make_image_folder(tmp_path / "data")
    wd, gcs, out = tmp_path / "wd", tmp_path / "gcs", tmp_path / "predictions.csv"
    (gcs / "bucket").mkdir(parents=True)
    np.savez(gcs / "bucket" / "ckpt.npz", w=np.arange(6.0).reshape(2, 3))
    code = f"GCS_ROOT = {str(gcs)!r}\n" + FAKE_GCS + textwrap.dedent(f"""
        from etils import epath
        import predict
        from vqt_jax import cli
        from vqt_jax.checkpoints import files
        from vqt_jax.training import metrics_io

        assert cli.run(["main.py", "--config=tests/tiny_config.py:{folder}", "--workdir={wd}",
                        "--config.epochs=1", "--config.cache=on",
                        "--config.baselines=('linear',)"]) == 0
        assert predict.run(["--model", "{wd}/model.vqt", "--output", "{out}", "{folder}/test"]) == 0
        assert type(epath.Path("gs://bucket")._backend).__name__ == "_FileSystemSpecBackend"
        kind, arrays = files.read("gs://bucket/ckpt.npz")
        assert kind == "npz" and arrays["w"].shape == (2, 3)
        epath.Path("gs://bucket/run").mkdir(parents=True)
        writer = metrics_io.create_writer("gs://bucket/run", is_chief=True)
        writer.write_scalars(1, {{"train/loss": 0.5}})
        writer.close()
        print(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))
    """)
    env = {**xla_env.env(None), "VQT_JAX_CACHE": str(tmp_path / "cache")}
    proc = _python(code, env, block=BLOCK_ONLY_TF)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    results = json.loads((wd / "results.json").read_text())
    assert results["cached"] and 0 <= results["baselines"]["linear"]["top1"] <= 1
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert "hparams" in rows[0] and "test/top1" in rows[-1]
    assert len(list(wd.glob("events.out.tfevents.*"))) == 1
    rows = out.read_text().splitlines()
    assert rows[0] == "path,task,rank,class,probability" and len(rows) > 15
    run = gcs / "bucket" / "run"
    assert json.loads((run / "metrics.jsonl").read_text()) == {"step": 1, "train/loss": 0.5}
    assert len(list(run.glob("events.out.tfevents.*"))) == 1


def test_sweep_speed_tiny_and_the_demos_data_without_tensorflow(tmp_path):
    """`sweep_speed.py --setups gpu --tiny` (the protocol at T = 1 with its compression stage,
    each stage as one program, in a spawned process, and the 19-task estimate) and
    configs/demo.py's data preparation, with TensorFlow and TFDS blocked in every process: a
    sitecustomize on PYTHONPATH installs the blocker, so the spawned process has it too."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCK_TF)
    env = {**xla_env.env(None), "VQT_JAX_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(block), REPO])}
    # The demo's preparation writes the Fashion-MNIST folder (`init=''`: random weights, no
    # ONNX conversion); the blocker is in place in a fresh interpreter.
    code = textwrap.dedent("""
        import importlib.util
        from configs import demo
        from vqt_jax import preparations
        from vqt_jax.data import fashion_mnist
        try:
            import tensorflow_datasets
        except ImportError as e:
            assert "blocked" in str(e)
        else:
            raise AssertionError("the blocker is not installed")
        try:
            fashion_mnist.find_fashion_mnist()
        except FileNotFoundError:
            print("no dataset")
        else:
            config = demo.get_config()
            config.init = ""
            preparations.fashion_mnist_dinov2(config)
            print(sorted(os.listdir(config.data_dir)))
    """)
    proc = _python("import os\n" + code, env, block="")
    assert proc.returncode == 0, proc.stdout[-3000:]
    if proc.stdout.strip().splitlines()[-1] != "no dataset":
        assert proc.stdout.strip().splitlines()[-1] == "['.fashion_mnist_subset.json', 'test', "\
            "'train', 'val']"
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "experiments/sweep_speed.py", "--setups", "gpu",
                           "--tiny", "--ts", "1", "--json", str(out)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    r = json.loads(out.read_text())
    (task,) = r["tasks"]
    assert (task["T"], task["compression"], task["test_images"]) == (1, True, 9)
    assert 0 < task["compile_s"] < task["seconds"] and task["test_evaluation_ms_per_image"] > 0
    assert len(task["test_top1"]) == 5 and task["profile"]["compression"] > 0
    # The 12 tasks the release runs at T = 1.
    assert len(r["estimate"]["per_task_s"]) == 12 and r["estimate"]["not_measured_T"] == [10, 20]
