"""Every method of `vqt_jax.methods.METHODS`: what trains, what stays frozen, what it computes.

Each method gets one short real training run (`train.run` on a tiny image folder) that must
lower the loss, leave every frozen leaf bit-identical and change every trainable leaf. The
feature tests then check what the parts do to the backbone: zero-initialised adapters and LoRA
reproduce it exactly at init, VPT changes the ordinary tokens, VQT does not, and VQT's queries
combined with VPT-deep read the prompted keys/values.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import train_utils
from vqt_jax import checkpoints, methods, resolve
from vqt_jax import trainable as trainable_lib
from vqt_jax.models import create_model
from vqt_jax.training import train

NUM_CLASSES = 3
IMAGE_SIZE = 16
# Small parts, so that every run stays a few seconds; the widths come from train_utils.
PART_SIZES = dict(num_queries=2, num_prompts=3, adapter_dim=4, lora_rank=2)

# What each method trains, by group of leaves: 'head' is params/head/*, 'backbone' every other
# params/* leaf, anything else a whole extra collection. Written out by hand (not derived from
# the METHODS table) so that a wrong rule there fails here.
EXPECTED_TRAINABLE: dict[str, set[str]] = {
    "vqt": {"queries", "head"},
    "linear": {"head"},
    "full": {"backbone", "head"},
    "vpt_shallow": {"prompts", "head"},
    "vpt_deep": {"prompts", "head"},
    "adaptformer": {"adapter", "head"},
    "lora": {"lora", "head"},
    "head2toe": {"head"},
    "vqt+vpt_deep": {"queries", "prompts", "head"},
    "vqt+adaptformer": {"queries", "adapter", "head"},
    "vqt+lora": {"queries", "lora", "head"},
}

# Peak learning rates for six steps with each method's release optimiser (config.optimizer
# stays unset, so train.run picks it from METHODS): SGD needs a larger lr than Adam to move
# the zero-initialised head within a few steps; AdamW moves the whole backbone, so less.
LR = {"adam": 0.02, "sgd": 0.2, "adamw": 5e-3}

ZERO_INIT = {  # the zero-initialised leaf that makes a part the identity at init
    "adapter": "up_kernel",
    "lora": "b",
}


def _group(key: str) -> str:
    collection, _, rest = key.partition("/")
    if collection != "params":
        return collection
    return "head" if rest.startswith("head/") else "backbone"


def _model_dict(method: str) -> dict:
    """config.model of the tiny test model, adjusted for `method`."""
    model = dict(train_utils.TINY_MODEL, **PART_SIZES, prompt_dropout=0.0, query_dropout=0.0)
    model.pop("variant")
    return methods.model_kwargs(method, model)


def _model(method: str, num_classes: int | None = NUM_CLASSES):
    return create_model(None, num_classes=num_classes, **_model_dict(method))


def _abstract(model) -> dict:
    """The model's variables as shapes, without initialising anything."""
    return jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32))


def _pretrained(model) -> dict:
    """The model's fresh variables with the golden big_vision backbone loaded into `params`."""
    fresh = model.init(jax.random.key(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))
    return checkpoints.load(str(train_utils.GOLDEN / "bv_vit.npz"), fresh,
                            image_size=IMAGE_SIZE)


def _pretrained_backbone(model) -> dict[str, np.ndarray]:
    """The golden backbone as `checkpoints.load` puts it into the model's `params`, flat.

    Loaded into abstract variables: the backbone comes out concrete, and nothing is
    initialised (which would cost a compilation per method).
    """
    loaded = checkpoints.load(str(train_utils.GOLDEN / "bv_vit.npz"), _abstract(model),
                              image_size=IMAGE_SIZE)
    return {k: np.asarray(v) for k, v in trainable_lib.flatten(loaded).items()
            if _group(k) == "backbone"}


def _images(n: int = 2, seed: int = 3) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (n, IMAGE_SIZE, IMAGE_SIZE, 3))


def _set(variables: dict, key: str, value) -> dict:
    flat = trainable_lib.flatten(variables)
    assert key in flat, sorted(flat)
    flat[key] = value
    return trainable_lib.unflatten(flat)


def test_every_method_has_an_expectation():
    assert set(EXPECTED_TRAINABLE) == set(methods.METHODS)


# ---------------------------------------------------------------------------------------------
# The trainable set.


@pytest.mark.parametrize("method", list(methods.METHODS))
def test_trainable_set_is_exactly_the_expected_groups(method):
    variables = _abstract(_model(method))
    trainable, frozen = trainable_lib.partition(variables, trainable_lib.rule_for(method))
    keys = list(trainable_lib.flatten(variables))
    expected = EXPECTED_TRAINABLE[method]
    # The model has exactly the parts the method uses (model_kwargs switched the others off) ...
    assert {_group(k) for k in keys} == expected | {"backbone"}
    # ... and every leaf of an expected group trains, every other leaf is frozen.
    assert set(trainable) == {k for k in keys if _group(k) in expected}
    assert set(frozen) == {k for k in keys if _group(k) not in expected}


def test_part_shapes_follow_the_config():
    d, depth = train_utils.TINY_MODEL["width"], train_utils.TINY_MODEL["depth"]

    def shapes(method):
        flat = trainable_lib.flatten(_abstract(_model(method)))
        return {k: tuple(s.shape) for k, s in flat.items()}

    p, t = PART_SIZES["num_prompts"], PART_SIZES["num_queries"]
    assert shapes("vpt_shallow")["prompts/tokens"] == (1, p, d)
    assert shapes("vpt_deep")["prompts/tokens"] == (depth, p, d)
    assert shapes("vqt")["queries/tokens"] == (depth, t, d)
    blk = "Transformer/encoderblock_0/"
    lora = shapes("lora")
    assert lora[f"lora/{blk}MultiHeadDotProductAttention_0/lora_query/a"] == (
        d, PART_SIZES["lora_rank"])
    assert f"lora/{blk}MultiHeadDotProductAttention_0/lora_value/b" in lora
    assert shapes("adaptformer")[f"adapter/{blk}Adapter_0/up_kernel"] == (
        PART_SIZES["adapter_dim"], d)
    # Head2Toe's head reads each block's CLS and mean patch token.
    assert shapes("head2toe")["params/head/kernel"] == (2 * depth * d, NUM_CLASSES)


# ---------------------------------------------------------------------------------------------
# One short training run per method.


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory) -> str:
    """A folder whose val/ and test/ hold exactly the train/ images.

    So the evaluation that `train.run` ends with (split='val': train on train/, evaluate on
    val/) is a deterministic loss over the training set itself.
    """
    root = Path(tmp_path_factory.mktemp("methods"))
    train_utils.make_image_folder(root, counts=(("train", 8),), num_classes=NUM_CLASSES,
                                  size=IMAGE_SIZE)
    for split in ("val", "test"):
        shutil.copytree(root / "train", root / split)
    return str(root)


def _config(folder: str, method: str):
    """A few steps of `method` on the tiny model, with its release optimiser.

    One device: the sharded step is tested elsewhere (test_train.py), and a one-device mesh
    compiles faster. No cache (config.cache='off'): these runs test the methods themselves.
    """
    config = train_utils.tiny_config(
        data_dir=folder, method=method, split="val", image_size=IMAGE_SIZE, epochs=2,
        warmup_epochs=0, schedule_per_epoch=False, wd=0.0, cache="off",
        log_every_steps=1, checkpoint_every_steps=1000, num_devices=1,
    )
    config.model.update(PART_SIZES)
    # A zero head (the big_vision protocol's), so that every run starts at loss ln(C).
    config.model.update(head_init="zeros", head_bias_init=0.0)
    config.lr = LR[methods.get(method).optimizer]
    return config


class _InitialVariables:
    """Records (as host copies) the variables `train.run` partitions into trainable/frozen.

    They are the exact starting point of training: fresh init plus the loaded backbone. They
    are copied at once because the train step donates its inputs.
    """

    def __init__(self, partition):
        self._partition = partition
        self.variables: dict | None = None

    def __call__(self, variables, rule):
        if self.variables is None:
            self.variables = {k: np.array(v) for k, v in trainable_lib.flatten(variables).items()}
        return self._partition(variables, rule)


@pytest.mark.parametrize("method", list(methods.METHODS))
def test_short_run_lowers_loss_and_trains_only_the_trainable_set(method, train_folder,
                                                                 tmp_path, monkeypatch):
    spy = _InitialVariables(trainable_lib.partition)
    monkeypatch.setattr(train.trainable_lib, "partition", spy)
    config = resolve.resolve(_config(train_folder, method))  # the run's, which builds its model
    results, variables = train.run(config, str(tmp_path))
    monkeypatch.undo()
    assert spy.variables is not None, "train.run no longer partitions its variables"
    initial = spy.variables
    final = {k: np.asarray(v) for k, v in trainable_lib.flatten(variables).items()}
    assert set(final) == set(initial)

    rule = trainable_lib.rule_for(method)
    trainable, frozen = trainable_lib.partition(final, rule)
    assert {_group(k) for k in trainable} == EXPECTED_TRAINABLE[method]
    assert results["num_trainable"] == sum(v.size for v in trainable.values())

    # The backbone train.run started from is the pretrained one; frozen leaves never moved.
    pretrained = _pretrained_backbone(train.build_model(config, NUM_CLASSES))
    assert set(pretrained) == {k for k in initial if _group(k) == "backbone"}
    for k, v in pretrained.items():
        np.testing.assert_array_equal(initial[k], v, err_msg=k)
    for k, v in frozen.items():
        np.testing.assert_array_equal(v, initial[k], err_msg=f"frozen leaf {k} changed")
    unchanged = [k for k, v in trainable.items() if np.array_equal(v, initial[k])]
    assert not unchanged, f"trainable leaves that did not move: {unchanged}"

    # The head starts at zero, so the initial loss is ln(C) on any data; the final loss is
    # evaluated without dropout on the training images themselves (val/ is a copy of train/).
    assert not initial["params/head/kernel"].any() and not initial["params/head/bias"].any()
    assert results["num_eval_examples"] == 8 * NUM_CLASSES
    assert results["eval_loss"] < 0.75 * math.log(NUM_CLASSES), results


@pytest.mark.parametrize("method", [m for m, spec in methods.METHODS.items() if spec.parts])
def test_part_of_size_zero_fails_before_compiling(method, train_folder, tmp_path, monkeypatch):
    def no_jit(*a, **k):
        raise AssertionError("compiled before validating the config")

    monkeypatch.setattr(train.jax, "jit", no_jit)
    for part in methods.get(method).parts:
        for field in methods.PARTS[part]:
            config = _config(train_folder, method)
            config.model[field] = 0
            with pytest.raises(ValueError, match=rf"method '{re.escape(method)}' needs "
                                                 rf"config\.model\.{field} > 0"):
                train.run(config, str(tmp_path / "wd"))
    assert not (tmp_path / "wd" / "checkpoints").exists()


def test_unknown_method_fails_before_compiling(train_folder, tmp_path, monkeypatch):
    def no_jit(*a, **k):
        raise AssertionError("compiled before validating the config")

    monkeypatch.setattr(train.jax, "jit", no_jit)
    config = _config(train_folder, "vqt")
    config.method = "vpt_medium"
    with pytest.raises(ValueError, match=r"Unknown method 'vpt_medium'; choose from vqt, linear"):
        train.run(config, str(tmp_path / "wd"))
    assert not (tmp_path / "wd" / "checkpoints").exists()
    with pytest.raises(ValueError, match="Unknown method"):
        methods.model_kwargs("vpt_medium", {})


# ---------------------------------------------------------------------------------------------
# What the parts do to the backbone's features.

BACKBONE_FEATURES = ("cls", "tokens", "blocks")


def _features(model, variables, images):
    return jax.tree.map(np.asarray, model.apply(variables, images, method="features"))


def _plain_features(variables, images):
    """The plain backbone's features with the same `params` (a fresh zero head)."""
    plain = _model("linear", num_classes=None)
    params = {k: v for k, v in variables["params"].items() if k != "head"}
    return _features(plain, {"params": params}, images)


@pytest.mark.parametrize("method", ["adaptformer", "lora", "vqt+adaptformer", "vqt+lora"])
def test_zero_init_parts_reproduce_the_backbone_until_perturbed(method):
    model = _model(method)
    variables = _pretrained(model)
    images = _images()
    plain = _plain_features(variables, images)
    ours = _features(model, variables, images)
    for key in BACKBONE_FEATURES:
        np.testing.assert_array_equal(ours[key], plain[key], err_msg=key)

    # Turning the zero-initialised leaves on must change the features (the test can fail).
    part = next(p for p in ("adapter", "lora") if p in methods.get(method).parts)
    flat = trainable_lib.flatten(variables)
    zero = [k for k in flat if k.startswith(f"{part}/") and k.endswith(f"/{ZERO_INIT[part]}")]
    assert len(zero) >= train_utils.TINY_MODEL["depth"]
    for i, k in enumerate(zero):
        assert not np.asarray(flat[k]).any(), k
        flat[k] = 0.5 * jax.random.normal(jax.random.key(10 + i), flat[k].shape)
    perturbed = _features(model, trainable_lib.unflatten(flat), images)
    for key in BACKBONE_FEATURES:
        assert np.abs(perturbed[key] - plain[key]).max() > 1e-3, key


def test_vqt_leaves_the_backbone_bit_identical_and_vpt_deep_does_not():
    images = _images()
    vqt = _model("vqt")
    v_vqt = _pretrained(vqt)
    plain = _plain_features(v_vqt, images)
    ours = _features(vqt, v_vqt, images)
    for key in BACKBONE_FEATURES:
        np.testing.assert_array_equal(ours[key], plain[key], err_msg=key)

    vpt = _model("vpt_deep")
    v_vpt = _pretrained(vpt)
    prompted = _features(vpt, v_vpt, images)
    p = PART_SIZES["num_prompts"]
    # The prompts sit after the class token; the ordinary tokens are the others.
    ordinary = np.r_[0, 1 + p:prompted["blocks"].shape[2]]
    assert prompted["blocks"].shape[2] == plain["blocks"].shape[2] + p
    assert np.abs(prompted["cls"] - plain["cls"]).max() > 1e-3
    # Every layer's ordinary tokens change (deep prompts act at every layer).
    diff = np.abs(prompted["blocks"][:, :, ordinary] - plain["blocks"]).max(axis=(0, 2, 3))
    assert (diff > 1e-3).all(), diff


def test_vqt_with_vpt_deep_queries_read_the_prompted_keys_and_values():
    images = _images()
    both = _model("vqt+vpt_deep")
    variables = _pretrained(both)
    out = _features(both, variables, images)

    # The same queries on the unprompted backbone give other outputs at every layer.
    vqt = _model("vqt")
    v_vqt = {"params": variables["params"], "queries": variables["queries"]}
    plain = _features(vqt, v_vqt, images)
    diff = np.abs(out["queries"] - plain["queries"]).max(axis=(0, 2, 3))
    assert (diff > 1e-4).all(), diff

    # They are exactly the query path over each layer's prompted keys/values (N + P tokens).
    cached = both.apply(variables, images, method="cache_features")
    n = (IMAGE_SIZE // 8) ** 2 + 1
    assert cached["k"].shape[3] == n + PART_SIZES["num_prompts"]  # [B, M, H, N, Dh]
    from_kv = both.apply(variables, {k: cached[k] for k in ("k", "v", "cls")},
                         method="features_from_cache")
    np.testing.assert_allclose(np.asarray(from_kv["queries"]), out["queries"],
                               rtol=1e-5, atol=1e-6)

    # Layer m's queries read layer m's prompts: changing layer 1's prompts leaves the layer-0
    # query outputs bit-identical and changes the layer-1 ones.
    tokens = np.array(variables["prompts"]["tokens"])
    # Random, not a constant shift: LayerNorm would remove a shift shared by all channels.
    tokens[1] += 0.5 * np.random.default_rng(0).standard_normal(tokens[1].shape)
    moved = _features(both, _set(variables, "prompts/tokens", jnp.asarray(tokens)), images)
    np.testing.assert_array_equal(moved["queries"][:, 0], out["queries"][:, 0])
    assert np.abs(moved["queries"][:, 1] - out["queries"][:, 1]).max() > 1e-4
