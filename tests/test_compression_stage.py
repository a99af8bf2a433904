"""The compression stages on the engine; in train mode (the release's) query dropout is on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import train_utils
from vqt_jax import resolve
from vqt_jax import trainable as trainable_lib
from vqt_jax.models import ViT
from vqt_jax.training import caching, compression_stage, engine, train


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


def _features(model, variables, batch, rng, train_mode=True):
    """The head input the stage's loss sees: its logits through an identity head."""
    f = 48 * (1 + 2 * 2)  # tests/train_utils.TINY_MODEL: width 48, depth 2, T 2
    trainable, frozen = trainable_lib.partition(variables, trainable_lib.rule_for("vqt"))
    head = {"head/kernel": jnp.eye(f), "head/bias": jnp.zeros(f)}
    fn = compression_stage.loss_fn(model, train_mode, 0.0)
    batch = {**batch, "mask": jnp.ones(len(batch["label"]))}
    return np.asarray(jax.jit(fn)(head, {"trained": trainable}, frozen, batch, rng)[1])


def test_train_mode_features_draw_query_dropout(folder, tmp_path):
    config = resolve.resolve(_config(folder))  # the run's config, which builds its model
    config.model.query_dropout = 0.5
    config.compression.enabled = False
    _, variables = train.run(config, str(tmp_path / "run"))
    model = train.build_model(config, 3)
    mesh = train.make_mesh()
    plan = caching.plan_cache(config, model, 60, str(tmp_path / "run"))
    cache = caching.get_cache(plan, config, model, variables, mesh)
    batch = cache.gather(np.arange(4), ["k", "v", "cls"])
    a, b = (_features(model, variables, batch, jax.random.key(i)) for i in (0, 1))
    assert not np.allclose(a, b)  # a fresh dropout draw per step
    np.testing.assert_array_equal(a, _features(model, variables, batch, jax.random.key(0)))
    # The final CLS (the first D features) never sees the queries; with dropout off the
    # train-mode features are the eval-mode ones.
    np.testing.assert_allclose(a[:, :48], b[:, :48])
    no_dropout = model.clone(query_dropout=0.0)
    evals = no_dropout.apply(variables, batch, method=ViT.features_from_cache)["pre_logits"]
    np.testing.assert_allclose(_features(no_dropout, variables, batch, jax.random.key(0)),
                               np.asarray(evals), rtol=1e-5, atol=1e-6)
    # Eval mode (`compression.train_mode=False`): no draw.
    np.testing.assert_allclose(_features(model, variables, batch, jax.random.key(1), False),
                               np.asarray(evals), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("on_device", ["on", "off"])
def test_run_compresses_in_train_mode(folder, tmp_path, monkeypatch, on_device):
    """Both stages run on the engine, from the run's own source: the device cache, or the
    host cache."""
    calls = []
    real = compression_stage._stage

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(compression_stage, "_stage", spy)
    config = _config(folder, cache_on_device=on_device)
    results, _ = train.run(config, str(tmp_path))
    comp = results["compression"]
    features = 48 * (1 + 2 * 2)
    assert comp["train_mode"] is True
    assert comp["num_features"] == features
    assert comp["num_kept"] == int(0.3 * features)
    assert comp["top1"] > 1 / 3 + 0.3
    assert [c["lasso"] for c in calls] == [1e-4, 0.0]
    assert calls[0]["kept"] is None and calls[1]["kept"].shape == (1, comp["num_kept"])
    kind = engine.DeviceSource if on_device == "on" else engine.HostSource
    assert all(isinstance(c["source"], kind) for c in calls)
    assert results["reported"]["metric"] == "compression.top1" or not results.get("reported")
