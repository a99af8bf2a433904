"""Compression and baseline heads after training, on cached and on freshly computed features."""

from __future__ import annotations

import numpy as np
import pytest

from tests import train_utils
from vqt_jax import compression
from vqt_jax.training import feature_heads, train


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


def test_compression_and_baselines_from_the_cache(folder, tmp_path):
    results, _ = train.run(_config(folder, cache="on"), str(tmp_path))
    assert results["cached"]
    comp = results["compression"]
    depth, width, queries = 2, 48, 2  # tests/train_utils.TINY_MODEL
    features = width * (1 + depth * queries)
    assert comp["num_features"] == features
    assert comp["num_kept"] == compression.num_to_keep(features, 0.3) == round(0.3 * features)
    chance = 1 / 3
    assert comp["top1"] > chance + 0.3
    h2t = results["baselines"]["head2toe"]
    assert h2t["num_features"] == depth * 2 * width  # each block: class token + mean patch
    assert h2t["num_kept"] == round(0.3 * h2t["num_features"])
    assert results["baselines"]["linear"]["num_features"] == width
    for name in ("linear", "head2toe"):
        assert results["baselines"][name]["top1"] > chance + 0.3, name


def test_cached_and_computed_features_agree(folder, tmp_path):
    config = _config(folder, cache="on")
    model = train.build_model(config, 3)
    results, variables = train.run(config, str(tmp_path / "run"))
    mesh = train.make_mesh()
    plan = train.plan_cache(config, model, 60, str(tmp_path / "run"))
    cache = train.get_cache(plan, config, model, variables, mesh)
    from_cache, evals = feature_heads.compute(config, model, variables, mesh, cache)
    from_images, evals2 = feature_heads.compute(config, model, variables, mesh, None)
    for k in ("pre_logits", "cls", "pooled", "label"):
        np.testing.assert_allclose(from_cache[k], from_images[k], rtol=1e-5, atol=1e-6,
                                   err_msg=k)
        np.testing.assert_array_equal(evals[k], evals2[k])
    assert len(evals["label"]) == results["num_eval_examples"] == 24


def test_unknown_baseline_fails_before_training(folder, tmp_path):
    with pytest.raises(ValueError, match="config.baselines: unknown 'svm'"):
        train.run(_config(folder, baselines=("svm",)), str(tmp_path))
