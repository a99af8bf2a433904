"""Exported runs (`model.vqt`) and the predictor: round trip, many tasks in one pass, refusals.

Three tiny runs on one image folder (split 'test': trained on train+val, evaluated on test):
two VQT runs that differ in their query count and seed, and a VPT-shallow run (its prompts
change the backbone's tokens, so it needs a forward of its own).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

from tests import train_utils
from vqt_jax import data, export, serving
from vqt_jax.data import folder
from vqt_jax.training import batches as batches_lib
from vqt_jax.training import train

# One xdist worker trains the module's runs (the `runs` fixture) once for all its tests.
pytestmark = pytest.mark.xdist_group("serving")
RUNS = {  # name -> config overrides
    "a": dict(method="vqt", save_predictions=True),
    "b": dict(method="vqt", seed=1, lr=0.1),
    "p": dict(method="vpt_shallow"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (config, workdir, results, final variables)} and the data root."""
    root = tmp_path_factory.mktemp("serving")
    data_dir = train_utils.make_image_folder(root / "data")
    out = {}
    for name, overrides in RUNS.items():
        config = train_utils.tiny_config(data_dir=data_dir, split="test", epochs=2, **overrides)
        if name == "b":
            config.model.num_queries = 1
        if name == "p":
            config.model.num_prompts = 2
        workdir = root / name
        results, variables = train.run(config, str(workdir))
        out[name] = (config, workdir, results, variables)
    return root, out


def export_path(runs, name: str) -> str:
    return str(runs[1][name][1] / export.EXPORT_FILE)


def test_a_run_exports_its_small_part(runs):
    _, by_name = runs
    config, workdir, results, _ = by_name["a"]
    assert results["export"] == export.EXPORT_FILE
    assert json.loads((workdir / "results.json").read_text())["export"] == export.EXPORT_FILE
    e = export.read(str(workdir / export.EXPORT_FILE))
    # VQT's own part only: its queries and head; the backbone stays in the checkpoint.
    assert sorted(e.arrays) == ["params/head/bias", "params/head/kernel", "queries/tokens"]
    assert e.class_names == ["class0", "class1", "class2"]
    assert e.meta["backbone"]["init"] == config.init
    assert e.meta["backbone"]["sha256"] == export.checkpoint_sha256(config.init)
    assert e.meta["results"]["top1"] == results["top1"]
    assert os.path.getsize(workdir / export.EXPORT_FILE) < 20_000


def _test_images(runs):
    """The test split's files and their images as `data.file_batches` preprocesses them."""
    root, by_name = runs
    config = by_name["a"][0]
    paths = list(folder.listing(str(root / "data"), "test", "eval").paths)
    images = np.concatenate([x for _, x in data.file_batches(
        paths, batch_size=4, image_size=config.image_size,
        normalization=data.as_normalization(config.normalization),
        round_resized=config.resize == "uint8")])
    return paths, images


def test_predictions_equal_the_runs_own_evaluation(runs):
    _, by_name = runs
    paths, images = _test_images(runs)
    for name in RUNS:
        config, _, results, variables = by_name[name]
        plan = train.plan_run(config, None)
        # Prediction preprocesses files as the evaluation pipeline does, to the bit.
        batches = list(batches_lib.eval_batches(plan.config, plan.mesh))
        evaluated = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
        labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
        np.testing.assert_array_equal(images, evaluated)
        reference = np.asarray(jax.jit(plan.model.apply)(variables, images))
        predictor = serving.Predictor([export_path(runs, name)], batch_size=4)
        logits = predictor.logits(images)[predictor.names[0]]
        # Batches of 4 against all images at once: the matmul kernels differ with the batch
        # shape, by up to 3e-6 here on an AVX-512 CPU.
        np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)
        predictions = list(predictor.predict_files(paths, top_k=3))
        names = predictor.tasks[0].exported.class_names
        top1 = np.mean([names.index(p.top[0][0]) == y
                        for p, y in zip(predictions, labels, strict=True)])
        assert top1 == results["top1"], name
        assert all(len(p.top) == 3 and p.top[0][1] >= p.top[1][1] for p in predictions)


def test_many_tasks_in_one_pass_equal_each_alone(runs):
    _, images = _test_images(runs)
    lines = []
    together = serving.Predictor([export_path(runs, n) for n in RUNS], batch_size=4,
                                 log=lines.append)
    names = together.names
    assert names == ["a", "b", "p"]  # folder exports are named after their run's directory
    assert "One backbone pass per batch serves 2 VQT task(s): a, b" in lines
    assert any(line.startswith("Task 'p' (vpt_shallow) needs a whole forward of its own")
               for line in lines)
    both = together.logits(images)
    for name in RUNS:
        alone = serving.Predictor([f"{name}={export_path(runs, name)}"], batch_size=4)
        # Other programs (one serves several heads): float32 sums may be ordered otherwise.
        np.testing.assert_allclose(both[name], alone.logits(images)[name], rtol=1e-5,
                                   atol=1e-5)
    # The tasks read one backbone pass: a's and b's logits differ (they are other runs).
    assert not np.allclose(both["a"][:, :3], both["b"][:, :3])


def test_serving_in_steps_equals_one_batch_at_once(runs):
    """On CPU a device runs its rows of a batch a few at a time (`inference.in_steps`): 16 rows on
    one device are two steps of 8, with the logits of one pass over each task's model."""
    _, by_name = runs
    _, images = _test_images(runs)
    predictor = serving.Predictor([export_path(runs, n) for n in RUNS], batch_size=16,
                                  num_devices=1)
    batch = jax.ShapeDtypeStruct((16, *images.shape[1:]), np.float32)
    assert "while" in predictor._fn.lower(predictor._variables, batch).as_text()
    stepped = predictor.logits(images)
    for name in RUNS:
        config, _, _, variables = by_name[name]
        model = train.plan_run(config, None).model
        one_pass = np.asarray(jax.jit(model.apply)(variables, images))
        np.testing.assert_allclose(stepped[name], one_pass, rtol=1e-5, atol=1e-5, err_msg=name)


def _rewrite(src: str, dst: str, change) -> str:
    """A copy of an export with its meta changed by `change(meta)`."""
    e = export.read(src)
    meta = json.loads(json.dumps(e.meta))
    change(meta)
    np.savez(dst, **{export.META: np.frombuffer(json.dumps(meta).encode(), np.uint8)},
             **e.arrays)
    os.replace(dst + ".npz", dst)
    return dst


def test_refusals_name_the_problem(runs, tmp_path):
    root, by_name = runs
    a = export_path(runs, "a")
    # Another backbone file (one weight changed): refused, naming both files' hashes.
    other = tmp_path / "other.npz"
    weights = dict(np.load(by_name["a"][0].init))
    key = next(k for k in weights if k.endswith("kernel"))
    weights[key] = weights[key] + 1e-3
    np.savez(other, **weights)
    with pytest.raises(export.ExportError, match=r"other\.npz .* is not the checkpoint"):
        serving.Predictor([a], backbone=str(other))
    # Tasks whose input differs cannot share a pass.
    def other_normalization(meta):
        config = meta["config"]
        config["normalization"] = ("inception" if config["normalization"] == "imagenet"
                                   else "imagenet")

    odd = _rewrite(a, str(tmp_path / "odd.vqt"), other_normalization)
    with pytest.raises(ValueError, match="their normalization differs"):
        serving.Predictor([a, odd])
    # Two tasks of one name.
    with pytest.raises(ValueError, match="Two models are named 'x'"):
        serving.Predictor([f"x={a}", f"x={export_path(runs, 'b')}"])
    # Not an export.
    with pytest.raises(export.ExportError, match="not a (readable )?vqt_jax export"):
        export.read(str(root / "a" / "config.json"))
    with pytest.raises(export.ExportError, match="version 99"):
        export.read(_rewrite(a, str(tmp_path / "v99.vqt"), lambda m: m.update(version=99)))


def test_predict_command(runs, tmp_path, capsys):
    import predict

    root, _ = runs
    images = tmp_path / "images"
    shutil.copytree(root / "data" / "test", images)
    (images / "class0" / "broken.png").write_bytes(b"not an image")
    (images / "notes.txt").write_text("not an image either")
    out = tmp_path / "preds.csv"
    argv = ["--model", export_path(runs, "a"), "--model", export_path(runs, "p"),
            "--top_k", "2", "--output", str(out), str(images)]
    assert predict.run(argv) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping {images / 'class0' / 'broken.png'}" in err
    assert ("Classified 15 images for 2 task(s) (a, p); skipped 1 that do not decode and 1 "
            "files without an image extension") in err
    rows = out.read_text().splitlines()
    assert rows[0] == "path,task,rank,class,probability"
    assert len(rows) == 1 + 15 * 2 * 2
    jsonl = tmp_path / "preds.jsonl"
    assert predict.run(argv[:-3] + ["--output", str(jsonl), str(images / "class1" / "0.png")]) == 0
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert [x["task"] for x in lines] == ["a", "p"] and len(lines[0]["top"]) == 2
    # Bad input: one error line, exit status 2, no output file.
    bad = tmp_path / "bad.csv"
    assert predict.run(["--model", str(tmp_path / "missing.vqt"), "--output", str(bad),
                        str(images)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: Export file not found") and not bad.exists()


def test_evaluation_json_against_scikit_learn(runs):
    from sklearn.metrics import confusion_matrix, recall_score

    root, by_name = runs
    _, workdir, results, _ = by_name["a"]
    report = json.loads((workdir / "evaluation.json").read_text())
    assert report["top1"] == results["top1"] and report["num_examples"] == 15
    listing = folder.listing(str(root / "data"), "test", "eval")
    predictions = report["predictions"]
    assert [p["index"] for p in predictions] == list(range(15))
    labels = [p["label"] for p in predictions]
    predicted = [p["prediction"] for p in predictions]
    assert labels == list(listing.labels)
    np.testing.assert_array_equal(report["confusion"],
                                  confusion_matrix(labels, predicted, labels=[0, 1, 2]))
    recall = recall_score(labels, predicted, labels=[0, 1, 2], average=None, zero_division=0)
    np.testing.assert_allclose([c["top1"] for c in report["per_class"]], recall)
    assert [c["count"] for c in report["per_class"]] == [5, 5, 5]
    # They are the exported model's top-1 for the same files.
    predictor = serving.Predictor([export_path(runs, "a")], batch_size=4)
    names = predictor.tasks[0].exported.class_names
    assert predicted == [names.index(p.top[0][0]) for p in
                         predictor.predict_files(list(listing.paths), top_k=1)]
