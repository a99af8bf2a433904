"""Tests of experiments/plot.py on a tiny trained VQT run (a few seconds of training)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from tests import train_utils
from tests.scripts import load_script
from vqt_jax import data, resolve
from vqt_jax import trainable as trainable_lib
from vqt_jax import workdir as workdir_lib
from vqt_jax.models import create_model
from vqt_jax.training import train

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUM_CLASSES = 3


plot = load_script("plot")


def _config(folder: str):
    return train_utils.tiny_config(data_dir=folder, epochs=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny VQT run: (config, workdir, the run's final variables)."""
    folder = train_utils.make_image_folder(tmp_path_factory.mktemp("folder"))
    workdir = tmp_path_factory.mktemp("run")
    config = resolve.resolve(_config(folder))  # the config the run trains and records
    _, variables = train.run(config, str(workdir))
    config_json = workdir / workdir_lib.CONFIG_FILE
    if not config_json.exists():
        # Where the trainer does not record its config yet, write what it would have.
        workdir_lib.write_json(str(config_json), workdir_lib.as_dict(config))
    return config, str(workdir), variables


def _tiny_model(**overrides):
    kwargs = {k: v for k, v in train_utils.TINY_MODEL.items() if k != "variant"}
    return create_model(None, num_classes=2, **{**kwargs, **overrides})


def _random_variables(model, seed=0):
    """Random variables of the right shapes, without compiling `model.init` (slow on CPU)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), shapes)


def _images(config, n=3):
    images, labels = plot.eval_images(config, n)
    return images, labels


def test_attention_probabilities_and_maps(run):
    config, _, variables = run
    model = train.build_model(config, NUM_CLASSES)
    images, _ = _images(config)
    m, h, t = model.depth, model.num_heads, model.num_queries
    grid = config.image_size // model.patch_size[0]  # 32 / 8 = 4
    n = 1 + grid * grid  # class token + patches; VQT adds no tokens to the ordinary stream

    probs = plot.query_attention(model, variables, images)
    assert probs.shape == (3, m, h, t, n)
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)

    maps = plot.query_attention_maps(model, variables, images)
    assert maps.shape == (3, m, grid, grid)
    assert np.all(maps >= 0)
    # The maps are the patches' share: all the mass but the class token's.
    cls_share = probs[..., 0].mean(axis=(2, 3))
    np.testing.assert_allclose(maps.sum((-1, -2)), 1.0 - cls_share, atol=1e-5)
    assert np.all(cls_share < 1 - 1e-3)  # something is left to draw
    # Patch order: row-major over the grid.
    expected = probs[:, :, :, 1, 1:].mean(axis=2).reshape(3, m, grid, grid)
    np.testing.assert_allclose(plot.maps_from_probs(probs, (grid, grid), query=1), expected,
                               rtol=1e-6, atol=1e-7)
    # Layers and images attend differently (the maps are not a constant).
    assert not np.allclose(maps[:, 0], maps[:, 1], atol=1e-3)
    assert not np.allclose(maps[0], maps[1], atol=1e-4)


def test_maps_without_class_token_and_with_prompts():
    # gap pooling (no class token) plus VPT prompts: the prefix is the prompts only.
    model = _tiny_model(pool_type="gap", num_prompts=3)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    variables = _random_variables(model)
    probs = plot.query_attention(model, variables, images)
    assert probs.shape[-1] == 3 + 16
    maps = plot.query_attention_maps(model, variables, images)
    assert maps.shape == (2, model.depth, 4, 4)
    np.testing.assert_allclose(maps.sum((-1, -2)), 1 - probs[..., :3].sum(-1).mean((2, 3)),
                               atol=1e-5)


def test_a_model_without_queries_is_refused():
    model = _tiny_model(num_queries=0)
    images = jnp.zeros((1, 32, 32, 3))
    variables = _random_variables(model)
    with pytest.raises(ValueError, match="no query tokens"):
        plot.query_attention_maps(model, variables, images)


def test_restore_run_gives_the_trained_variables(run):
    config, workdir, variables = run
    _, restored, _, step = plot.restore_run(config, workdir)
    assert step == json.loads((Path(workdir) / "results.json").read_text())["steps"]
    want, got = trainable_lib.flatten(variables), trainable_lib.flatten(restored)
    assert set(want) == set(got)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
    # The head really was trained (a fresh head is zeros), so the restore is not a re-init.
    assert np.abs(np.asarray(got["params/head/kernel"])).max() > 0


def test_restore_refuses_another_method(run):
    config, workdir, _ = run
    other = _config(config.data_dir)
    other.method = "linear"
    with pytest.raises(ValueError, match="method"):
        plot.restore_run(other, workdir)


def test_eval_images_mix_classes_and_denormalize_inverts(run):
    config, _, _ = run
    images, labels = _images(config)
    assert sorted(labels.tolist()) == [0, 1, 2]  # the folder lists class0's images first
    pixels = plot.denormalize(images, config.normalization)
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(
        data.normalize_array(pixels, config.normalization), images)
    raw = np.random.default_rng(1).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    for norm in ("inception", "imagenet", ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))):
        np.testing.assert_array_equal(plot.denormalize(data.normalize_array(raw, norm), norm),
                                      raw)


def _write_sweep_csv(directory: Path) -> Path:
    # Written by vtab_sweep.py's own writer, so the reader follows its real format.
    sweep = load_script("vtab_sweep")
    results = [
        sweep.TaskResult("dtd", "natural", 0.125, 1e-3, 0.70, (0.71, 0.72, 0.70)),
        sweep.TaskResult("eurosat", "specialized", 0.25, 0.0, 0.95, (0.94, 0.95, 0.93)),
        sweep.TaskResult("dsprites_loc", "structured", 0.5, 0.0, 0.8, (0.78, 0.80, 0.79)),
    ]
    sweep.write_reports(results, directory)
    return directory


def _write_memory_json(path: Path, with_times: bool = True) -> Path:
    # The layout of experiments/memory.py's --json output (its `run` result).
    def setting(method, train, total, secs, num_trainable):
        s = {"method": method, "train": train, "optimizer": "adam" if train else None,
             "num_trainable": num_trainable,
             "memory_mib": {"temp": total * 0.8, "argument": total * 0.2, "output": 1.0,
                            "alias": 1.0, "total": total},
             "memory_vs_vqt": total / 14.0, "memory_vs_forward": total / 10.0}
        if with_times:
            s["step_seconds"] = secs
        return s

    doc = {"variant": "Ti/16", "batch": 8, "image_size": 32, "device": "cpu", "stash_mib": 3.0,
           "model": {"num_queries": 1},
           "settings": {"forward": setting("vqt", False, 10.0, 0.1, 0),
                        "vqt": setting("vqt", True, 14.0, 0.12, 2_500),
                        "lora": setting("lora", True, 30.0, 0.3, 150_000),
                        "full": setting("full", True, 60.0, None, 5_500_000),
                        "broken": {"error": "did not compile"}},
           "targets": {"memory vqt/full": {"value": 0.23, "at_most": 0.2, "met": False}}}
    path.write_text(json.dumps(doc))
    return path


def _assert_png(path: Path, min_bytes: int = 5000) -> tuple[int, int]:
    blob = path.read_bytes()
    assert blob[:8] == PNG_MAGIC, path
    assert len(blob) > min_bytes, (path, len(blob))
    with Image.open(path) as im:
        return im.size


def _write_config_file(path: Path, data_dir: str, **model) -> Path:
    """A config file for --config: the run's tiny config, with `model` fields changed."""
    path.write_text(
        "from tests import train_utils\n\n\n"
        "def get_config(arg=None):\n"
        f"    c = train_utils.tiny_config(data_dir={data_dir!r}, epochs=2)\n"
        f"    c.model.update({model!r})\n"
        "    return c\n"
    )
    return path


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_main_writes_the_four_figures(run, tmp_path, capsys):
    # No --config: the model is rebuilt from the config the run recorded in config.json.
    _, workdir, _ = run
    sweep_dir = _write_sweep_csv(tmp_path / "sweep")
    memory = _write_memory_json(tmp_path / "memory.json")
    written = plot.main(["plot.py", f"--workdir={workdir}", f"--sweep={sweep_dir}",
                         f"--memory={memory}", "--num_images=3"])
    plots = Path(workdir) / "plots"
    names = ["query_attention.png", "sweep_accuracy.png", "memory.png", "confusion.png"]
    assert written == [str(plots / n) for n in names]
    out = capsys.readouterr().out
    for n in names:
        assert f"wrote {plots / n}" in out
    # 3 image rows x (image + 2 layers) cells of 1.6 in at 100 dpi, plus the title's 0.6 in.
    assert _assert_png(plots / "query_attention.png") == (480, 540)
    _assert_png(plots / "sweep_accuracy.png")
    _assert_png(plots / "memory.png")
    _assert_png(plots / "confusion.png")


def test_recorded_config_draws_what_the_explicit_config_draws(run, tmp_path, capsys):
    config, workdir, _ = run
    recorded = json.loads((Path(workdir) / "config.json").read_text())
    assert recorded["model"]["patch_size"] == [8, 8]  # JSON: the tuple came back as a list
    config_file = _write_config_file(tmp_path / "tiny_config.py", config.data_dir)
    figures = {}
    for name, extra in (("recorded", []), ("explicit", [f"--config={config_file}"])):
        out = tmp_path / name
        written = plot.main(["plot.py", f"--workdir={workdir}", f"--out={out}",
                             "--num_images=3", *extra])
        assert written == [str(out / plot.ATTENTION_PNG), str(out / plot.CONFUSION_PNG)]
        figures[name] = _pixels(out / plot.ATTENTION_PNG)
    np.testing.assert_array_equal(figures["recorded"], figures["explicit"])
    # A field that does not change the run (here where the data lives) may differ.
    moved = tmp_path / "moved"
    shutil.copytree(config.data_dir, moved)
    assert plot.run_config(workdir, train_utils.tiny_config(data_dir=str(moved), epochs=2)
                           ).data_dir == str(moved)
    capsys.readouterr()


def test_a_conflicting_config_names_the_differing_fields(run, tmp_path, capsys):
    config, workdir, _ = run
    config_file = _write_config_file(tmp_path / "other.py", config.data_dir, num_queries=3)
    with pytest.raises(SystemExit) as e:
        plot.main(["plot.py", f"--workdir={workdir}", f"--config={config_file}"])
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert "model.num_queries: 2 (recorded) vs 3 (--config)" in message
    assert "config.json" in message
    assert not (Path(workdir) / "plots" / "other").exists()
    # write_plots (for notebooks) skips the figure for the same reason instead.
    other = plot.parse_flags(["plot.py", f"--workdir={workdir}",
                              f"--config={config_file}"]).config
    lines = []
    written = plot.write_plots(workdir, config=other, out_dir=str(tmp_path / "out"),
                               log=lines.append)
    assert written == [str(tmp_path / "out" / plot.CONFUSION_PNG)]  # from evaluation.json
    assert any(line.startswith("skipped query_attention.png") and "model.num_queries" in line
               for line in lines), lines
    capsys.readouterr()


def test_a_run_without_config_json_needs_config(run, tmp_path, capsys):
    # A run from before config.json was recorded: checkpoints, results.json, no config.
    config, workdir, _ = run
    old = tmp_path / "old_run"
    shutil.copytree(workdir, old, ignore=shutil.ignore_patterns("config.json", "plots"))
    with pytest.raises(SystemExit) as e:
        plot.main(["plot.py", f"--workdir={old}"])
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert f"{old / 'config.json'} not found" in message and "--config" in message
    assert not (old / "plots").exists()
    # With --config it is drawn as before.
    config_file = _write_config_file(tmp_path / "tiny_config.py", config.data_dir)
    # (3 images, as in the other tests, so the compiled forward is reused.)
    written = plot.main(["plot.py", f"--workdir={old}", f"--config={config_file}",
                         "--num_images=3"])
    assert written == [str(old / "plots" / plot.ATTENTION_PNG),
                       str(old / "plots" / plot.CONFUSION_PNG)]
    capsys.readouterr()


def test_recorded_config_turns_json_lists_back_into_tuples(tmp_path):
    config = ml_collections.ConfigDict({
        "method": "vqt", "normalization": ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),
        "baselines": ("linear", "head2toe"),
        "model": {"variant": None, **{k: v for k, v in train_utils.TINY_MODEL.items()
                                      if k != "variant"}},
    })
    # As a run records it: with the method's release recipe filled in.
    workdir_lib.write_json(str(tmp_path / "config.json"),
                           workdir_lib.as_dict(resolve.resolve(config)))
    assert json.loads((tmp_path / "config.json").read_text())["baselines"] == [
        "linear", "head2toe"]
    loaded = plot.recorded_config(str(tmp_path))
    assert loaded.normalization == config.normalization
    assert loaded.baselines == ("linear", "head2toe")
    assert loaded.model.patch_size == (8, 8)
    assert data.as_normalization(loaded.normalization) == config.normalization
    # The model it builds is hashable (jit takes it as a static argument) and the same.
    model = train.build_model(loaded, NUM_CLASSES)
    assert hash(model) == hash(train.build_model(config, NUM_CLASSES))
    assert model == train.build_model(config, NUM_CLASSES)
    assert plot.run_config(str(tmp_path), config) is not None  # no difference to report


def test_figures_are_skipped_or_refused_when_inputs_are_missing(tmp_path, capsys):
    # No run in the workdir (no checkpoints, no config.json): only the other figures count.
    with pytest.raises(SystemExit, match="No figure could be drawn"):
        plot.main(["plot.py", f"--workdir={tmp_path}", f"--sweep={tmp_path / 'nowhere'}"])
    sweep_dir = _write_sweep_csv(tmp_path / "sweep")
    assert plot.main(["plot.py", f"--workdir={sweep_dir}", f"--sweep={sweep_dir}"]) == [
        str(sweep_dir / "plots" / plot.SWEEP_PNG)]
    assert f"skipped query_attention.png: no checkpoints in {sweep_dir}" in \
        capsys.readouterr().out
    # Only the memory figure's input exists, and its settings have no step times.
    memory = _write_memory_json(tmp_path / "memory.json", with_times=False)
    written = plot.write_plots(str(tmp_path), memory=str(memory))
    assert written == [str(tmp_path / "plots" / "memory.png")]
    out = capsys.readouterr().out
    assert "skipped query_attention.png" in out and "skipped sweep_accuracy.png" in out
    _assert_png(tmp_path / "plots" / "memory.png")
    _, rows = plot.read_memory_json(str(memory))
    # 'broken' has no figure
    assert [(r["name"], r["train"]) for r in rows] == [
        ("forward", False), ("vqt", True), ("lora", True), ("full", True)]
    assert all(r["step_seconds"] is None for r in rows)


def test_memory_reader_takes_the_recorded_older_layout():
    # The measurement kept in the repository predates the per-method fields.
    recorded = REPO_ROOT / "experiments" / "results" / "memory_b16_bs64.json"
    header, rows = plot.read_memory_json(str(recorded))
    assert header["variant"] == "B/16"
    assert [r["name"] for r in rows][:2] == ["forward", "vqt"]
    assert not rows[0]["train"] and all(r["train"] for r in rows[1:])
    assert all(r["total"] > 0 and r["step_seconds"] > 0 for r in rows)


def test_sweep_reader_follows_the_writer(tmp_path):
    tasks, summaries = plot.read_sweep_csv(str(_write_sweep_csv(tmp_path) / "results.csv"))
    assert [t["name"] for t in tasks] == ["dtd", "eurosat", "dsprites_loc"]
    assert tasks[0]["mean"] == pytest.approx(71.0)
    assert tasks[0]["std"] == pytest.approx(1.0)
    assert [s["name"] for s in summaries] == ["natural", "specialized", "structured",
                                              "mean_of_group_means", "mean_over_tasks"]
