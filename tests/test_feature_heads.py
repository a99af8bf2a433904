"""Compression and baseline heads after training, on cached and on freshly computed features."""

from __future__ import annotations

import numpy as np
import pytest

from tests import train_utils
from vqt_jax import compression, linear_probe, resolve
from vqt_jax.data import folder as folder_lib
from vqt_jax.training import caching, feature_heads, train

# One xdist worker runs the module: two tests read the `cached_run` fixture's run.
pytestmark = pytest.mark.xdist_group("feature_heads")

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return train_utils.make_image_folder(tmp_path_factory.mktemp("folder"),
                                         counts=(("train", 16), ("val", 4), ("test", 8)))


def _config(folder, **overrides):
    overrides.setdefault("baselines", ("linear", "head2toe"))
    c = train_utils.tiny_config(data_dir=folder, epochs=4, **overrides)
    c.compression.enabled = True
    c.compression.keep_frac = 0.3
    c.compression.epochs = 30
    return c


@pytest.fixture(scope="module")
def cached_run(folder, tmp_path_factory):
    """(resolved config, results, final variables, workdir) of one cached run, which both
    tests below read."""
    config = resolve.resolve(_config(folder, cache="on"))  # the run's config, as it caches
    workdir = str(tmp_path_factory.mktemp("run"))
    results, variables = train.run(config, workdir)
    return config, results, variables, workdir


def test_compression_and_baselines_from_the_cache(cached_run):
    _, results, _, _ = cached_run
    assert results["cached"]
    comp = results["compression"]
    depth, width, queries = 2, 48, 2  # tests/train_utils.TINY_MODEL
    features = width * (1 + depth * queries)
    assert comp["num_features"] == features
    assert comp["num_kept"] == compression.num_to_keep(features, 0.3) == int(0.3 * features)
    chance = 1 / 3
    assert comp["top1"] > chance + 0.3
    h2t = results["baselines"]["head2toe"]
    assert h2t["num_features"] == depth * 2 * width  # each block: class token + mean patch
    # Head2Toe's keep fraction is chosen on the validation part, not compression's keep_frac.
    assert h2t["keep_frac"] in linear_probe.DEFAULT_KEEP_FRACS
    assert h2t["num_kept"] == compression.num_to_keep(h2t["num_features"], h2t["keep_frac"],
                                                      nearest=True)
    assert results["baselines"]["linear"]["num_features"] == width
    for name in ("linear", "head2toe"):
        r = results["baselines"][name]
        assert r["top1"] > chance + 0.3, name
        assert r["C"] in linear_probe.DEFAULT_CS and r["converged"], name
        assert r["num_val"] == 3 * 4  # split='test': the val/ folder's images
        assert 0 < r["val_top1"] <= 1


def test_cached_and_computed_features_agree(cached_run):
    config, results, variables, workdir = cached_run
    model = train.build_model(config, 3)
    mesh = train.make_mesh()
    plan = caching.plan_cache(config, model, 60, workdir)
    cache = caching.get_cache(plan, config, model, variables, mesh)
    from_cache = feature_heads.train_features(config, model, variables, mesh, cache)
    from_images = feature_heads.train_features(config, model, variables, mesh, None)
    evals = feature_heads.eval_features(config, model, variables, mesh)
    # The run's baselines are linear_probe's tuned heads on the cached features.
    is_val = feature_heads.validation_rows(config, from_cache["label"])
    for name, fit in feature_heads.BASELINES.items():
        again = fit(from_cache, evals, is_val)
        assert again["C"] == results["baselines"][name]["C"], name
        assert again["top1"] == pytest.approx(results["baselines"][name]["top1"]), name
    for k in ("cls", "pooled", "label"):
        np.testing.assert_allclose(from_cache[k], from_images[k], rtol=1e-5, atol=1e-6,
                                   err_msg=k)
    assert len(evals["label"]) == results["num_eval_examples"] == 24


def test_validation_part_is_the_val_folder_for_split_test(folder):
    config = _config(folder)
    assert config.split == "test"
    files = folder_lib.listing(folder, "test", "train")  # the rows' order: train/, then val/
    labels = np.asarray(files.labels)
    is_val = feature_heads.validation_rows(config, labels)
    from_val = np.array(["/val/" in path for path in files.paths])
    np.testing.assert_array_equal(is_val, from_val)
    assert is_val.sum() == 12 and is_val[-12:].all()


def test_validation_part_for_split_val_holds_out_every_class():
    config = _config("unused", split="val")
    labels = np.repeat([0, 1, 2], [10, 6, 3])  # an image folder lists its rows class by class
    is_val = feature_heads.validation_rows(config, labels)
    # The last 20% of each class's rows (floor): 2 of 10, 1 of 6, 0 of 3.
    np.testing.assert_array_equal(np.flatnonzero(is_val), [8, 9, 15])
    with pytest.raises(ValueError, match="too few to hold out"):
        feature_heads.validation_rows(config, np.array([0, 0, 1, 1]))


def test_validation_part_cannot_be_everything(folder):
    # 12 val images cannot be the validation part of 12 training rows: nothing left to fit.
    with pytest.raises(ValueError, match="val split has 12 examples, which cannot be"):
        feature_heads.validation_rows(_config(folder), np.zeros(12, np.int32))


def test_unknown_baseline_fails_before_training(folder, tmp_path):
    with pytest.raises(ValueError, match="config.baselines: unknown 'svm'"):
        train.run(_config(folder, baselines=("svm",)), str(tmp_path))
