"""The optimisers and recipes of `vqt_jax.training.optim` / `vqt_jax.methods` against the releases.

The releases' update rules are transcribed here in numpy (float64, as torch computes its bias
corrections), independently of optax and of our code, from:

* torch.optim.Adam with coupled L2: the VQT release's 'adam' (andytu28/VQT
  src/solver/optimizer.py passes `weight_decay` per param group; `last_layer.bias` gets 0);
* torch.optim.SGD, momentum 0.9, coupled L2: the VPT release's 'sgd' (KMnP/vpt
  src/solver/optimizer.py, MOMENTUM 0.9 in configs/base-prompt.yaml and base-linear.yaml);
* the AdamW class of KMnP/vpt src/solver/optimizer.py (eps 1e-6 on the uncorrected sqrt(v),
  step size lr * sqrt(1 - b2^t) / (1 - b1^t), then p -= lr * wd * p on the updated p).

Which leaves each release decays is checked by naming our leaves as the releases' torch
modules name them and applying the releases' own string tests to those names.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import train_utils
from vqt_jax import methods
from vqt_jax import trainable as trainable_lib
from vqt_jax.models import create_model
from vqt_jax.training import optim

# ---------------------------------------------------------------------------------------------
# Our leaf names -> the releases' torch parameter names.
#
# VPT's ViT (KMnP/vpt src/models/vit_backbones/vit.py): Block has attention_norm, ffn_norm,
# attn.{query,key,value,out}, ffn.{fc1,fc2}; Encoder has encoder_norm; Embeddings has
# patch_embeddings, position_embeddings, cls_token; the prompts are
# transformer.prompt_embeddings / deep_prompt_embeddings (src/models/vit_prompt/vit.py) and the
# head is head.last_layer (src/models/mlp.py). VQT's queries: query_prompt_embeddings
# (andytu28/VQT src/models/vit_backbones/h2t_vit.py). AdaptFormer's adapter: adaptmlp.down_proj
# / up_proj (ShoufaChen/AdaptFormer models/custom_modules.py, models/adapter.py). LoRA has no
# release here; its names only need not to contain 'bias' or 'last_layer.bias'.
_BLOCK = "enc.transformer.encoder.layer.{}."
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_TORCH_NAMES: list[tuple[str, str]] = [
    (r"params/head/(kernel|bias)", "head.last_layer.{leaf}"),
    (r"params/embedding/(kernel|bias)", "enc.transformer.embeddings.patch_embeddings.{leaf}"),
    (r"params/pos_embedding", "enc.transformer.embeddings.position_embeddings"),
    (r"params/cls", "enc.transformer.embeddings.cls_token"),
    (r"params/Transformer/encoder_norm/(scale|bias)",
     "enc.transformer.encoder.encoder_norm.{leaf}"),
    (r"params/Transformer/encoderblock_(\d+)/LayerNorm_0/(scale|bias)",
     _BLOCK + "attention_norm.{leaf}"),
    (r"params/Transformer/encoderblock_(\d+)/LayerNorm_1/(scale|bias)",
     _BLOCK + "ffn_norm.{leaf}"),
    (r"params/Transformer/encoderblock_(\d+)/MultiHeadDotProductAttention_0/"
     r"(?P<proj>query|key|value|out)/(kernel|bias)", _BLOCK + "attn.{proj}.{leaf}"),
    (r"params/Transformer/encoderblock_(\d+)/MlpBlock_0/Dense_0/(kernel|bias)",
     _BLOCK + "ffn.fc1.{leaf}"),
    (r"params/Transformer/encoderblock_(\d+)/MlpBlock_0/Dense_1/(kernel|bias)",
     _BLOCK + "ffn.fc2.{leaf}"),
    (r"prompts/tokens", "enc.transformer.prompt_embeddings"),
    (r"queries/tokens", "enc.transformer.query_prompt_embeddings"),
    (r"adapter/Transformer/encoderblock_(\d+)/Adapter_0/(?P<proj>down|up)_(kernel|bias)",
     _BLOCK + "adaptmlp.{proj}_proj.{leaf}"),
    (r"lora/Transformer/encoderblock_(\d+)/MultiHeadDotProductAttention_0/"
     r"lora_(?P<proj>query|value)/(?P<ab>a|b)", _BLOCK + "attn.{proj}.lora_{ab}"),
]


def torch_name(key: str) -> str:
    """The torch name of one of our flat leaf keys; fails for a leaf not mapped above."""
    for pattern, template in _TORCH_NAMES:
        m = re.fullmatch(pattern, key)
        if m:
            groups = [g for g in m.groups() if g is not None]
            block = next((g for g in groups if g.isdigit()), "")
            leaf = _LEAF.get(groups[-1], "") if groups else ""
            return template.format(block, leaf=leaf, **m.groupdict())
    raise AssertionError(f"no torch name for {key!r}: add it to _TORCH_NAMES")


# The releases' decay tests, verbatim in effect, over torch names.
def vpt_adamw_decays(name: str) -> bool:
    # KMnP/vpt src/solver/optimizer.py, OPTIMIZER 'adamw'.
    no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
    return not any(nd in name for nd in no_decay)


def vpt_vqt_l2_decays(name: str) -> bool:
    # KMnP/vpt and andytu28/VQT src/solver/optimizer.py, OPTIMIZER 'sgd' / 'adam'.
    return "last_layer.bias" not in name


RELEASE_DECAYS = {"adamw": vpt_adamw_decays, "sgd": vpt_vqt_l2_decays,
                  "adam": vpt_vqt_l2_decays}

# ---------------------------------------------------------------------------------------------
# numpy transcriptions of the release update rules. Each takes params {name: array}, a list of
# gradient dicts, the lr of each step, wd and {name: decayed?}; returns the params after.


def np_torch_adam(params, grads, lrs, wd, decayed, b1=0.9, b2=0.999, eps=1e-8):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        for k in p:
            d = np.asarray(g[k], np.float64) + (wd * p[k] if decayed[k] else 0.0)
            m[k] = b1 * m[k] + (1 - b1) * d
            v[k] = b2 * v[k] + (1 - b2) * d * d
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            denom = np.sqrt(v[k]) / math.sqrt(bc2) + eps
            p[k] = p[k] - (lr / bc1) * m[k] / denom
    return p


def np_torch_sgd(params, grads, lrs, wd, decayed, momentum=0.9):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    buf: dict[str, np.ndarray] = {}
    for g, lr in zip(grads, lrs, strict=True):
        for k in p:
            d = np.asarray(g[k], np.float64) + (wd * p[k] if decayed[k] else 0.0)
            buf[k] = d.copy() if k not in buf else momentum * buf[k] + d
            p[k] = p[k] - lr * buf[k]
    return p


def np_vpt_adamw(params, grads, lrs, wd, decayed, b1=0.9, b2=0.999, eps=1e-6):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        for k in p:
            gk = np.asarray(g[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk * gk
            denom = np.sqrt(v[k]) + eps
            step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            p[k] = p[k] - step_size * m[k] / denom
            group_wd = wd if decayed[k] else 0.0
            if group_wd > 0.0:
                p[k] = p[k] - lr * group_wd * p[k]
    return p


def np_vpt_make_optimizer_adamw(params, grads, lrs, wd, decayed):
    """What the VPT release really runs for OPTIMIZER 'adamw': AdamW at wd 0.01 whatever wd > 0
    is asked for, and SGD (momentum 0.9, no decay) when wd is 0."""
    if wd > 0:
        return np_vpt_adamw(params, grads, lrs, 0.01, decayed)
    return np_torch_sgd(params, grads, lrs, 0.0, decayed)


NP_RELEASE = {"adam": np_torch_adam, "sgd": np_torch_sgd, "adamw": np_vpt_adamw}

# ---------------------------------------------------------------------------------------------
# A small pytree with named leaves, as train.py flattens them.

SHAPES = {
    "params/head/kernel": (5, 3),
    "params/head/bias": (3,),
    "prompts/tokens": (1, 2, 5),
    "queries/tokens": (2, 1, 5),
    "params/Transformer/encoderblock_0/LayerNorm_0/scale": (5,),
    "params/Transformer/encoderblock_0/LayerNorm_0/bias": (5,),
    "params/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel": (5, 4),
    "params/Transformer/encoderblock_0/MlpBlock_0/Dense_0/bias": (4,),
    "params/cls": (1, 1, 5),
    "adapter/Transformer/encoderblock_0/Adapter_0/down_bias": (2,),
}
# A leaf whose gradients are tiny, so that where eps enters the Adam update shows.
TINY_GRAD = "params/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"
# The lr of each step: the releases' first epoch runs at lr 0 (scheduler warm-up from 0).
LRS = (0.0, 0.05, 0.1, 0.08, 0.03)


def _tree(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    grads = []
    for _ in LRS:
        g = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
        g[TINY_GRAD] = (g[TINY_GRAD] * 1e-7).astype(np.float32)
        grads.append(g)
    return params, grads


def _schedule(step):
    return jnp.asarray(LRS, jnp.float32)[step]


def _run(tx: optax.GradientTransformation, params, grads) -> dict[str, np.ndarray]:
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(p)

    @jax.jit
    def step(p, state, g):
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state

    for g in grads:
        p, state = step(p, state, {k: jnp.asarray(v) for k, v in g.items()})
    return {k: np.asarray(v) for k, v in p.items()}


def _assert_close(ours, ref):
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6, atol=1e-6, err_msg=k)


# ---------------------------------------------------------------------------------------------
# Update rules.


@pytest.mark.parametrize("name", ["adam", "sgd", "adamw"])
@pytest.mark.parametrize("wd", [0.01, 0.001, 0.0])
def test_optimizer_matches_the_release_update_rule(name, wd):
    params, grads = _tree()
    decayed = {k: RELEASE_DECAYS[name](torch_name(k)) for k in params}
    ours = _run(optim.make_optimizer(_schedule, wd, params, name), params, grads)
    _assert_close(ours, NP_RELEASE[name](params, grads, LRS, wd, decayed))


def test_adamw_equals_the_release_where_the_release_is_not_degenerate():
    # The release's make_optimizer hard-codes AdamW's wd to 0.01: at wd 0.01 we are the
    # release, bit for bit within float32.
    params, grads = _tree(1)
    decayed = {k: vpt_adamw_decays(torch_name(k)) for k in params}
    ours = _run(optim.make_optimizer(_schedule, 0.01, params, "adamw"), params, grads)
    _assert_close(ours, np_vpt_make_optimizer_adamw(params, grads, LRS, 0.01, decayed))


@pytest.mark.parametrize("wd", [0.001, 0.0])
def test_adamw_follows_the_paper_where_the_release_is_degenerate(wd):
    # The release would run AdamW at wd 0.01 (wd 0.001 asked) or SGD (wd 0): we do neither,
    # but AdamW with the wd asked for (checked against the AdamW rule above).
    params, grads = _tree(2)
    decayed = {k: vpt_adamw_decays(torch_name(k)) for k in params}
    ours = _run(optim.make_optimizer(_schedule, wd, params, "adamw"), params, grads)
    release = np_vpt_make_optimizer_adamw(params, grads, LRS, wd, decayed)
    assert max(np.abs(ours[k] - release[k]).max() for k in ours) > 1e-3
    _assert_close(ours, np_vpt_adamw(params, grads, LRS, wd, decayed))


def test_adamw_is_not_optax_adamw():
    # optax.adamw puts eps on the bias-corrected sqrt(v) and decays the pre-step weight: on
    # tiny gradients the release's eps (1e-6 on the uncorrected sqrt(v)) differs visibly.
    params, grads = _tree(3)
    mask = optim.decay_mask(params, "adamw")
    ours = _run(optim.make_optimizer(_schedule, 0.01, params, "adamw"), params, grads)
    theirs = _run(optax.adamw(_schedule, weight_decay=0.01, mask=mask), params, grads)
    assert np.abs(ours[TINY_GRAD] - theirs[TINY_GRAD]).max() > 1e-4


def test_optimizers_take_a_traced_weight_decay():
    # compression.py sweeps wd as a traced value inside one jit.
    params, grads = _tree(4)

    @jax.jit
    def final(wd):
        p = {k: jnp.asarray(v) for k, v in params.items()}
        outs = []
        for name in optim.OPTIMIZERS:
            tx = optim.make_optimizer(_schedule, wd, p, name)
            q, state = p, tx.init(p)
            for g in grads:
                updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, q)
                q = optax.apply_updates(q, updates)
            outs.append(q)
        return outs

    for name, ours in zip(optim.OPTIMIZERS, final(jnp.float32(0.001)), strict=True):
        decayed = {k: RELEASE_DECAYS[name](torch_name(k)) for k in params}
        _assert_close({k: np.asarray(v) for k, v in ours.items()},
                      NP_RELEASE[name](params, grads, LRS, 0.001, decayed))


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="Unknown optimizer 'lamb'"):
        optim.make_optimizer(_schedule, 0.0, {"params/head/bias": jnp.zeros(3)}, "lamb")
    with pytest.raises(ValueError, match="Unknown optimizer 'lamb'"):
        optim.decay_mask({"params/head/bias": 0}, "lamb")
    with pytest.raises(ValueError, match="needs the params"):
        tx = optim.make_optimizer(_schedule, 0.0, {"params/cls": 0}, "adamw")
        tx.update({"params/cls": jnp.ones(2)}, tx.init({"params/cls": jnp.ones(2)}))


# ---------------------------------------------------------------------------------------------
# Which leaves are decayed.


def test_decayed_leaves_by_hand():
    keys = list(SHAPES)
    # VPT's SGD and VQT's Adam: everything but the head's bias, adapter biases included.
    for name in ("sgd", "adam"):
        mask = optim.decay_mask(dict.fromkeys(keys), name)
        assert [k for k in keys if not mask[k]] == ["params/head/bias"], name
    # VPT's AdamW: every bias exempt; LayerNorm scales and the class token decayed (its names
    # never contain 'LayerNorm').
    mask = optim.decay_mask(dict.fromkeys(keys), "adamw")
    assert sorted(k for k in keys if not mask[k]) == sorted(k for k in keys if "bias" in k)
    assert mask["params/Transformer/encoderblock_0/LayerNorm_0/scale"]
    assert mask["params/cls"]
    # compression.py's bare head.
    assert optim.decay_mask({"head/kernel": 0, "head/bias": 0}, "adam") == {
        "head/kernel": True, "head/bias": False}


def _trainable_keys(method: str) -> list[str]:
    model = dict(train_utils.TINY_MODEL, num_prompts=2, adapter_dim=4, lora_rank=2,
                 prompt_dropout=0.0, query_dropout=0.0)
    model.pop("variant")
    module = create_model(None, num_classes=3, **methods.model_kwargs(method, model))
    variables = jax.eval_shape(module.init, jax.random.key(0),
                               jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
    trainable, _ = trainable_lib.partition(variables, methods.get(method).trainable)
    return sorted(trainable)


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_each_method_decays_what_its_release_decays(method):
    name = methods.get(method).optimizer
    keys = _trainable_keys(method)
    mask = optim.decay_mask(dict.fromkeys(keys), name)
    assert mask == {k: RELEASE_DECAYS[name](torch_name(k)) for k in keys}
    assert not mask["params/head/bias"]
    assert mask["params/head/kernel"]


# ---------------------------------------------------------------------------------------------
# The METHODS table against the releases' values, written out here rather than imported.

WDS = (0.01, 0.001, 0.0001, 0.0)  # every get_lrwd_range of both releases used here
RELEASE_RECIPES = {
    # KMnP/vpt configs/base-finetune.yaml: OPTIMIZER adamw, WARMUP_EPOCH 5, BATCH_SIZE 384;
    # tune_vtab.py get_lrwd_range 'finetune': lr [0.001, 0.0001, 0.0005, 0.005].
    "full": ("adamw", 5, 384, (0.001, 0.0001, 0.0005, 0.005)),
    # KMnP/vpt configs/base-linear.yaml: OPTIMIZER sgd, WARMUP_EPOCH 10, BATCH_SIZE 1024;
    # tune_vtab.py 'linear': lr [50.0, 25., 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05].
    "linear": ("sgd", 10, 1024, (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)),
    # KMnP/vpt configs/base-prompt.yaml: OPTIMIZER sgd, WARMUP_EPOCH 10, BATCH_SIZE 128;
    # tune_vtab.py 'prompt': lr [5.0, 2.5, 1.0, 50.0, 25., 10.0, 0.5, 0.25, 0.1, 0.05].
    "vpt_shallow": ("sgd", 10, 128, (5.0, 2.5, 1.0, 50.0, 25.0, 10.0, 0.5, 0.25, 0.1, 0.05)),
    "vpt_deep": ("sgd", 10, 128, (5.0, 2.5, 1.0, 50.0, 25.0, 10.0, 0.5, 0.25, 0.1, 0.05)),
    # andytu28/VQT configs/h2t-prompt/vtab.yaml: WARMUP_EPOCH 10, BATCH_SIZE 128 (also
    # scripts/VQT/run_vqt_vtab.sh); head2toe_train.py 'h2t-prompt', adam, ViT-B:
    # lr [1.0, 0.5, 0.25, 0.1, 0.05].
    "vqt": ("adam", 10, 128, (1.0, 0.5, 0.25, 0.1, 0.05)),
}
# No VTAB-1k recipe in their releases: VQT's.
for _m in ("adaptformer", "lora", "head2toe", "vqt+vpt_deep", "vqt+adaptformer", "vqt+lora"):
    RELEASE_RECIPES[_m] = RELEASE_RECIPES["vqt"]


def test_every_method_has_a_release_recipe():
    assert set(RELEASE_RECIPES) == set(methods.METHODS)


@pytest.mark.parametrize("method", sorted(RELEASE_RECIPES))
def test_method_table_holds_the_release_recipe(method):
    m = methods.get(method)
    optimizer, warmup, batch, lrs = RELEASE_RECIPES[method]
    assert (m.optimizer, m.warmup_epochs, m.batch_size, m.lr_grid, m.wd_grid) == (
        optimizer, warmup, batch, lrs, WDS)
    assert m.optimizer in optim.OPTIMIZERS
    assert m.source


def test_vpt_prompt_dropout_per_variant():
    # KMnP/vpt demo.ipynb: "VPT-shallow (we don't use dropout for VPT-shallow)",
    # MODEL.PROMPT.DROPOUT "0.0"; its VPT-deep VTAB commands use "0.1" (the model default).
    assert methods.model_kwargs("vpt_shallow", {"num_prompts": 5})["prompt_dropout"] == 0.0
    assert "prompt_dropout" not in methods.model_kwargs("vpt_deep", {"num_prompts": 5})
