"""Model options left 'auto' are read from the backbone file by the resolve step
(vqt_jax/checkpoints/introspect.py, vqt_jax/resolve.py): from its headers only, with the
precedence user > protocol > file > default, and a contradiction named by its flag."""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import vtab
from tests import test_downloads as downloads
from tests import train_utils
from vqt_jax import cli, resolve
from vqt_jax.checkpoints import files, introspect
from vqt_jax.training import train

GOLDEN = train_utils.GOLDEN
CASES = json.loads((GOLDEN / "manifest.json").read_text())["cases"]
MODEL = ("variant", "layerscale", "num_registers", "pool_type", "mlp_act")


@pytest.fixture(autouse=True)
def _download_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("VQT_JAX_CACHE", str(tmp_path / "downloads"))


@pytest.fixture(scope="module")
def dinov2_s14(tmp_path_factory) -> str:
    """A DINOv2 ViT-S/14 with 4 registers in timm's layout: the keys that tell its options."""
    d = 384
    flat = {"patch_embed.proj.weight": np.zeros((d, 3, 14, 14), np.float32),
            "cls_token": np.zeros((1, 1, d), np.float32),
            "reg_token": np.zeros((1, 4, d), np.float32)}
    for i in range(12):
        flat[f"blocks.{i}.ls1.gamma"] = flat[f"blocks.{i}.norm1.weight"] = np.ones(d, np.float32)
    path = str(tmp_path_factory.mktemp("ckpt") / "dinov2_s14_reg4.safetensors")
    save_file(flat, path)
    return path


@pytest.fixture(scope="module")
def bv_b16(tmp_path_factory) -> str:
    """A big_vision ViT-B/16 .npz (under `params/`) with its class token."""
    flat = {"params/embedding/kernel": np.zeros((16, 16, 3, 768), np.float32),
            "params/cls": np.zeros((1, 1, 768), np.float32)}
    for i in range(12):
        flat[f"params/Transformer/encoderblock_{i}/LayerNorm_0/scale"] = np.ones(768, np.float32)
    path = str(tmp_path_factory.mktemp("ckpt") / "b16.npz")
    np.savez(path, **flat)
    return path


def _options(told: dict) -> tuple:
    return tuple(told[k] for k in MODEL)


@pytest.mark.parametrize("name, expected", [
    ("dinov2_reg.safetensors", (None, True, 2, "tok", "gelu")),
    ("dinov2_vit.safetensors", (None, True, 0, "tok", "gelu")),
    ("siglip_map.safetensors", (None, False, 0, "map", None)),
    ("siglip_map.npz", (None, False, 0, "map", None)),
    ("siglip_map_two_tower.npz:img", (None, False, 0, "map", None)),
    ("bv_scan_bf16.npz", (None, False, 0, "tok", None)),
    ("orig_vit.npz", (None, False, 0, "tok", None)),
    ("mae_vit.pth", (None, False, 0, "tok", None)),
])
def test_the_golden_files_tell_their_options(name, expected):
    told = introspect.model_options(str(GOLDEN / name))
    assert _options(told) == expected
    spec = next(c["model"] for c in CASES.values() if c["file"] == name)
    assert f"depth {spec['depth']}, patch {spec['patch_size'][0]}" in told["described"]


def test_named_variants_are_read_from_the_headers_alone(dinov2_s14, bv_b16, monkeypatch):
    monkeypatch.setattr(files, "read", lambda path: pytest.fail(f"read the weights of {path}"))
    assert _options(introspect.model_options(dinov2_s14)) == ("S/14", True, 4, "tok", "gelu")
    assert _options(introspect.model_options(bv_b16)) == ("B/16", False, 0, "tok", None)


def test_resolve_fills_auto_from_the_file_logs_it_and_is_idempotent(dinov2_s14, caplog):
    config = vtab.get_config("folder")
    with caplog.at_level(logging.INFO):
        once = resolve.resolve(config, {"init": dinov2_s14})
    assert _options(once.model) == ("S/14", True, 4, "tok", "gelu")  # gelu: the release's
    [line] = [r.getMessage() for r in caplog.records if "'auto'" in r.getMessage()]
    assert dinov2_s14 in line and "variant='S/14'" in line and "num_registers=4" in line
    assert resolve.resolve(once).to_dict() == once.to_dict()
    assert config.model.variant == "auto"  # the input is not modified


def test_precedence_user_then_protocol_then_file_then_default(dinov2_s14, bv_b16, caplog):
    # The protocol's activation before the file's, said in a warning that names the flag.
    with caplog.at_level(logging.WARNING):
        bv = resolve.resolve(vtab.get_config("folder,big_vision"), {"init": dinov2_s14})
    assert bv.model.mlp_act == "gelu_tanh"
    assert any("--config.model.mlp_act=gelu " in r.getMessage() for r in caplog.records)
    assert resolve.resolve(vtab.get_config("folder,big_vision"), {
        "init": dinov2_s14, "model.mlp_act": "auto"}).model.mlp_act == "gelu_tanh"
    # 'auto' with no protocol: the file's family, else the default.
    no_protocol = {"protocol": "", "model.mlp_act": "auto"}
    assert resolve.resolve(vtab.get_config("folder"), {**no_protocol, "init": dinov2_s14}
                           ).model.mlp_act == "gelu"
    assert resolve.resolve(vtab.get_config("folder"), {**no_protocol, "init": bv_b16}
                           ).model.mlp_act == "gelu_tanh"
    # The user's value before the file's (when the file can load into it).
    user = resolve.resolve(vtab.get_config("folder"),
                           {"init": dinov2_s14, "model.mlp_act": "quick_gelu"})
    assert user.model.mlp_act == "quick_gelu" and user.model.variant == "S/14"
    # No init: every option its documented default.
    plain = resolve.resolve(vtab.get_config("folder"), {"init": "", "protocol": "",
                                                        "model.mlp_act": "auto"})
    assert _options(plain.model) == tuple(introspect.DEFAULTS[k] for k in MODEL)


def test_a_url_is_read_once_downloaded_and_fetched_only_when_asked(dinov2_s14, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with open(dinov2_s14, "rb") as f, downloads.serve(downloads.send(f.read())) as base:
        url, config = f"{base}/dinov2.safetensors", vtab.get_config("folder")
        assert resolve.resolve(config, {"init": url}).model.variant == "B/16"  # the default
        assert not downloads.serve.last.hits and not os.path.exists(files.cache_path(url))
        assert resolve.resolve(config, {"init": url}, download=True).model.variant == "S/14"
    assert resolve.resolve(config, {"init": url}).model.variant == "S/14"  # from the cache


@pytest.mark.parametrize("flags, message", [
    (["--config.model.variant=B/16"], r"is a ViT-S/14 \(width 384, depth 12, patch 14\) but "
     r"config\.model\.variant='B/16'; set --config\.model\.variant=S/14 \(or 'auto'\)$"),
    (["--config.model.layerscale=False"], r"has layerscale=True but config\.model\.layerscale="
     r"False; set --config\.model\.layerscale=True \(or 'auto'\)$"),
    (["--config.model.num_registers=0"], r"set --config\.model\.num_registers=4 \(or 'auto'\)$"),
    (["--config.model.pool_type=map"], r"set --config\.model\.pool_type=tok \(or 'auto'\)$"),
    (["--config.init=/nope/x.safetensors"], r"^error: --config\.init: checkpoint file not "
     r"found: /nope/x\.safetensors \(the model options left 'auto', variant, layerscale"),
])
def test_a_contradiction_is_one_error_line_naming_the_flag(flags, message, dinov2_s14, tmp_path,
                                                           capsys):
    workdir = tmp_path / "wd"
    code = cli.run(["main.py", "--config=configs/vtab.py:folder", f"--config.data_dir={tmp_path}",
                    f"--workdir={workdir}", f"--config.init={dinov2_s14}", "--dry_run", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert not workdir.exists()


def test_the_command_line_sets_them_as_strings(dinov2_s14):
    options = cli.parse(["main.py", "--config=configs/vtab.py:folder", "--workdir=/tmp/x",
                         f"--config.init={dinov2_s14}", "--config.model.layerscale=True",
                         "--config.model.num_registers=4", "--config.model.variant=auto"])
    out = resolve.resolve(options.config)
    assert (out.model.layerscale, out.model.num_registers) == (True, 4)


def test_a_dry_run_builds_and_loads_the_model_the_file_describes(tmp_path):
    # The tiny golden DINOv2 with registers: its sizes set, every option it tells left 'auto'.
    model = CASES["dinov2_reg_safetensors"]["model"]
    config = train_utils.tiny_config(data_dir=train_utils.make_image_folder(tmp_path / "data"),
                                     init=str(GOLDEN / "dinov2_reg.safetensors"), image_size=42)
    config.model.update(patch_size=(14, 14), mlp_dim=model["mlp_dim"],
                        num_heads=model["num_heads"])
    plan = train.plan_run(config, None, dry_run=True)
    assert plan.pretrained is not None
    assert _options(plan.config.model)[1:] == (True, 2, "tok", "gelu")
