"""Feature compression in train mode (the release's): query dropout on in both stages."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests import train_utils
from vqt_jax import compression
from vqt_jax.models import ViT
from vqt_jax.training import compression_train, feature_heads, train


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return train_utils.make_image_folder(tmp_path_factory.mktemp("folder"),
                                         counts=(("train", 16), ("val", 4), ("test", 8)))


def _config(folder, **overrides):
    c = train_utils.tiny_config(data_dir=folder, epochs=4, cache="on", **overrides)
    c.compression.enabled = True
    c.compression.train_mode = True
    c.compression.keep_frac = 0.3
    c.compression.epochs = 20
    return c


def test_train_mode_features_draw_query_dropout(folder, tmp_path):
    config = _config(folder)
    config.model.query_dropout = 0.5
    config.compression.enabled = False
    _, variables = train.run(config, str(tmp_path / "run"))
    model = train.build_model(config, 3)
    mesh = train.make_mesh()
    plan = train.plan_cache(config, model, 60, str(tmp_path / "run"))
    cache = train.get_cache(plan, config, model, variables, mesh)
    batch = cache.gather(np.arange(4), ["k", "v", "cls"])
    fn = jax.jit(compression_train.train_mode_features(model, variables))
    a, b = (np.asarray(fn(batch, jax.random.key(i))) for i in (0, 1))
    assert not np.allclose(a, b)  # a fresh dropout draw per step
    np.testing.assert_array_equal(a, np.asarray(fn(batch, jax.random.key(0))))
    # The final CLS (the first D features) never sees the queries; with dropout off the
    # train-mode features are the eval-mode ones.
    np.testing.assert_allclose(a[:, :48], b[:, :48])
    no_dropout = model.clone(query_dropout=0.0)
    fn0 = compression_train.train_mode_features(no_dropout, variables)
    evals = no_dropout.apply(variables, batch, method=ViT.features_from_cache)["pre_logits"]
    np.testing.assert_allclose(np.asarray(fn0(batch, jax.random.key(0))), np.asarray(evals),
                               rtol=1e-5, atol=1e-6)


def test_run_compresses_in_train_mode(folder, tmp_path, monkeypatch):
    calls = []
    real = compression_train.train_head

    def spy(config, features_fn, batches, **kwargs):
        calls.append(kwargs)
        return real(config, features_fn, batches, **kwargs)

    monkeypatch.setattr(compression_train, "train_head", spy)
    # The fixed-feature fitter must not run in train mode.
    monkeypatch.setattr(compression, "compress", lambda *a, **k: pytest.fail("eval mode"))
    results, _ = train.run(_config(folder), str(tmp_path))
    comp = results["compression"]
    features = 48 * (1 + 2 * 2)  # tests/train_utils.TINY_MODEL: width 48, depth 2, T 2
    assert comp["train_mode"] is True
    assert comp["num_features"] == features
    assert comp["num_kept"] == round(0.3 * features)
    assert comp["top1"] > 1 / 3 + 0.3
    assert [c["lasso"] for c in calls] == [1e-4, 0.0]
    assert calls[0]["kept"] is None and len(calls[1]["kept"]) == comp["num_kept"]
    assert feature_heads.wanted(_config(folder))
