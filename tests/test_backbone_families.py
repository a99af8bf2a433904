"""SigLIP towers (MAP head pooling) and DINOv2 with registers under every method.

tests/test_checkpoints.py proves the loaded backbones equal timm's; here the methods meet them:
VQT's queries and its key/value cache read a MAP-pooled and a register-carrying backbone
without changing it, the MAP head and the registers stay frozen (but for full fine-tuning),
VPT's prompts stay out of the MAP pooling, registers out of patch pooling, and a whole VQT run
trains from the cache of a SigLIP tower.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import train_utils
from vqt_jax import checkpoints, methods
from vqt_jax import trainable as trainable_lib
from vqt_jax.models import ViT, create_model
from vqt_jax.models.vit import MAPHead
from vqt_jax.training import train

GOLDEN = train_utils.GOLDEN
CASES = json.loads((GOLDEN / "manifest.json").read_text())["cases"]
FAMILIES = ["siglip_map_npz", "siglip_map_safetensors", "dinov2_reg_safetensors"]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN / "golden.npz") as z:
        return {k: z[k] for k in z.files if not k.startswith("resample/")}


def _kwargs(case: str, **overrides) -> dict:
    kw = dict(CASES[case]["model"], **overrides)
    kw["patch_size"] = tuple(kw["patch_size"])
    return kw


def _loaded(case: str, **overrides) -> tuple[ViT, dict]:
    """The case's model with `overrides`, its checkpoint loaded and a random head."""
    spec = CASES[case]
    model = ViT(**_kwargs(case, **overrides))
    size = spec["image_size"]
    variables = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, size, size, 3)))
    loaded = checkpoints.load(str(GOLDEN / spec["file"]), variables, image_size=size)
    kernel = loaded["params"]["head"]["kernel"]
    head = {"kernel": jax.random.normal(jax.random.key(2), kernel.shape) * 0.3,
            "bias": loaded["params"]["head"]["bias"]}
    return model, {**loaded, "params": {**loaded["params"], "head": head}}


def _apply(model: ViT, *args, **kwargs):
    """`model.apply`, compiled: eager dispatch runs (and compiles) the forward op by op."""
    return jax.jit(model.apply, static_argnames=("method",))(*args, **kwargs)


@pytest.mark.parametrize("case", FAMILIES)
def test_vqt_leaves_the_backbone_as_timm_and_its_cache_gives_the_same_logits(case, golden):
    model, variables = _loaded(case, num_queries=2, query_dropout=0.0)
    images = golden[f"{case}/images"]
    feats = _apply(model, variables, images, method="features")
    # The pooled feature (the MAP output for SigLIP) and every token are timm's, queries or not.
    np.testing.assert_allclose(feats["cls"], golden[f"{case}/pre_logits"], **TOL)
    np.testing.assert_allclose(feats["tokens"], golden[f"{case}/tokens"], **TOL)
    # The cache holds what the head needs: the pooled feature and every token's keys/values,
    # the registers' included.
    cached = _apply(model, variables, images, method=ViT.cache_features)
    kw = CASES[case]["model"]
    patches = (CASES[case]["image_size"] // kw["patch_size"][0]) ** 2
    assert cached["k"].shape[3] == int(kw["class_token"]) + kw["num_registers"] + patches
    np.testing.assert_allclose(_apply(model, variables, cached, method=ViT.from_cache),
                               _apply(model, variables, images), **TOL)


@pytest.mark.parametrize("method", list(methods.METHODS))
def test_map_head_and_registers_train_only_with_the_backbone(method):
    kwargs = methods.model_kwargs(method, dict(
        _kwargs("siglip_map_npz", num_registers=2), num_queries=2, num_prompts=2,
        adapter_dim=4, lora_rank=2))
    model = create_model(None, **kwargs)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    trainable, _ = trainable_lib.partition(abstract, trainable_lib.rule_for(method))
    flat = trainable_lib.flatten(abstract)
    owned = [k for k in flat if k.startswith("params/MAPHead_0/") or k == "params/registers"]
    assert len(owned) == 16
    assert {k in trainable for k in owned} == {method == "full"}


def test_map_pools_the_image_tokens_without_vpt_prompts(golden):
    case = "siglip_map_npz"
    model, variables = _loaded(case, num_prompts=3, prompt_dropout=0.0)
    feats = _apply(model, variables, golden[f"{case}/images"], method="features")
    tokens = feats["tokens"]  # [B, P + N, D]: no class token, the prompts first
    head = MAPHead(num_heads=3, mlp_dim=96, mlp_act="gelu_tanh")
    pooled = head.apply({"params": variables["params"]["MAPHead_0"]}, tokens[:, 3:])
    np.testing.assert_allclose(feats["cls"], pooled, **TOL)
    with_prompts = head.apply({"params": variables["params"]["MAPHead_0"]}, tokens)
    assert np.abs(feats["cls"] - with_prompts).max() > 1e-3


def test_patch_pooling_leaves_out_the_registers(golden):
    case = "dinov2_reg_safetensors"
    model, variables = _loaded(case, head2toe=True)
    feats = _apply(model, variables, golden[f"{case}/images"], method="features")
    blocks = feats["blocks"]  # [B, M, 1 + R + N, D]
    expected = np.stack([blocks[:, :, 0], blocks[:, :, 3:].mean(axis=2)], axis=2)
    np.testing.assert_allclose(feats["pooled"], expected.reshape(blocks.shape[0], -1, 48), **TOL)
    gap, gap_variables = _loaded(case, pool_type="gap")
    out = _apply(gap, gap_variables, golden[f"{case}/images"], method="features")
    np.testing.assert_allclose(out["cls"], out["tokens"][:, 3:].mean(axis=1), **TOL)


def test_vqt_run_on_a_siglip_tower_trains_from_its_cache(tmp_path):
    root = pathlib.Path(train_utils.make_image_folder(tmp_path / "data"))
    shutil.rmtree(root / "val")
    shutil.copytree(root / "train", root / "val")  # evaluate on the training images
    config = train_utils.tiny_config(data_dir=str(root), split="val", cache="on",
                                     init=str(GOLDEN / "siglip_map.npz"))
    config.model.update({k: v for k, v in _kwargs("siglip_map_npz", num_queries=2).items()
                         if k != "num_classes"})
    results, variables = train.run(config, str(tmp_path / "run"))
    assert results["cached"] is True
    assert "MAPHead_0" in variables["params"] and "cls" not in variables["params"]
    assert results["eval_loss"] < 0.75 * math.log(3), results
