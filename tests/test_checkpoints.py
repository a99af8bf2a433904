"""Checkpoint loading: parity with timm on every file format, and clear errors on bad input.

The golden fixture (tests/fixtures/golden/) is written by tools/make_golden.py from random timm
ViTs: each file format holds one model, and golden.npz holds timm's outputs for it.
"""

import http.server
import json
import os
import pathlib
import shutil
import threading
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqt_jax import checkpoints
from vqt_jax.checkpoints import CheckpointError, files, resample
from vqt_jax.models import ViT

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
CASES = MANIFEST["cases"]


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN / "golden.npz") as z:
        return {k: z[k] for k in z.files}


def _model(case, **overrides):
    kw = dict(CASES[case]["model"])
    kw["patch_size"] = tuple(kw["patch_size"])
    kw.update(overrides)
    return ViT(**kw)


def _init(model, image_size):
    # Compiled: an eager init runs (and compiles) the model's forward op by op.
    return jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))


def _load(case, **model_overrides):
    spec = CASES[case]
    model = _model(case, **model_overrides)
    variables = _init(model, spec["image_size"])
    loaded = checkpoints.load(
        str(GOLDEN / spec["file"]), variables, image_size=spec["image_size"], dont_load=()
    )
    return model, loaded


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_timm(case, golden):
    model, variables = _load(case)
    images = golden[f"{case}/images"]
    feats = jax.jit(model.apply, static_argnames="method")(variables, images,
                                                           method="features")
    # timm itself agrees with its float64 goldens to ~2e-6; 1e-5 also tells exact from tanh GELU.
    tol = dict(atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(feats["logits"], golden[f"{case}/logits"], **tol)
    np.testing.assert_allclose(feats["cls"], golden[f"{case}/pre_logits"], **tol)
    np.testing.assert_allclose(feats["tokens"], golden[f"{case}/tokens"], **tol)
    blocks = np.moveaxis(golden[f"{case}/blocks"], 0, 1)  # (depth, B, N, D) -> (B, depth, N, D)
    np.testing.assert_allclose(feats["blocks"], blocks, **tol)


def test_head_and_queries_keep_their_init_by_default():
    spec = CASES["orig_npz"]
    model = _model("orig_npz", num_queries=2)
    variables = _init(model, spec["image_size"])
    loaded = checkpoints.load(str(GOLDEN / spec["file"]), variables)
    np.testing.assert_array_equal(loaded["queries"]["tokens"], variables["queries"]["tokens"])
    np.testing.assert_array_equal(loaded["params"]["head"]["kernel"],
                                  variables["params"]["head"]["kernel"])
    assert not np.array_equal(loaded["params"]["cls"], variables["params"]["cls"])
    # The input variables are untouched.
    assert np.all(np.asarray(variables["params"]["cls"]) == 0)


@pytest.mark.parametrize("rule", ["bicubic", "bicubic_antialias"])
def test_resample_rules_match_pytorch(rule, golden):
    # PyTorch's interpolate (bicubic, with and without antialias) in float64, recorded by
    # tools/make_golden.py: shrinking, growing and a non-square target.
    keys = [k for k in golden if k.startswith(f"resample/{rule}/")]
    assert len(keys) == 8
    for key in keys:
        side, target = key.split("/")[2:]
        size = tuple(int(n) for n in target.split("x"))
        ours = resample.resample_grid(golden[f"resample/input/{side}"], size, rule)
        np.testing.assert_allclose(ours, golden[key], atol=1e-5, rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("side,size", [(7, (3, 3)), (7, (9, 9)), (4, (4, 6)), (37, (16, 16))])
def test_bilinear_corners_matches_big_vision(side, size):
    # big_vision's (and vision_transformer's) resample_posemb is scipy.ndimage.zoom, order 1.
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    grid = np.random.default_rng(0).standard_normal((side, side, 3))
    ref = scipy_ndimage.zoom(grid, (size[0] / side, size[1] / side, 1), order=1)
    np.testing.assert_allclose(resample.resample_grid(grid, size, "bilinear_corners"), ref,
                               atol=1e-12)


def test_rules_differ_and_identity_is_kept():
    grid = np.random.default_rng(0).standard_normal((7, 7, 2)).astype(np.float32)
    outs = {r: resample.resample_grid(grid, (4, 4), r) for r in resample.RULES}
    assert len({o.tobytes() for o in outs.values()}) == 3
    assert resample.resample_grid(grid, (7, 7), "bicubic") is grid
    with pytest.raises(ValueError, match="choose from auto, bilinear_corners"):
        resample.check_rule("nearest")


@pytest.mark.parametrize("case,rule", [("bv_npz", "bilinear_corners"),
                                       ("orig_npz", "bilinear_corners"),
                                       ("timm_pth", "bicubic_antialias"),
                                       ("dinov2_safetensors", "bicubic_antialias")])
def test_auto_rule_is_the_families(case, rule):
    assert checkpoints.read_backbone(str(GOLDEN / CASES[case]["file"]), 3)[1] == rule


def _meta_dinov2_reg(tmp_path):
    """The timm DINOv2-reg fixture in Meta's own naming: `register_tokens`, a `mask_token`, and
    the class token's position entry in `pos_embed` (timm folds it into `cls_token`)."""
    from safetensors.numpy import load_file, save_file

    state = load_file(str(GOLDEN / CASES["dinov2_reg_safetensors"]["file"]))
    cls_pos = np.random.default_rng(1).standard_normal(state["cls_token"].shape, np.float32)
    state["register_tokens"] = state.pop("reg_token")
    state["cls_token"] = state["cls_token"] - cls_pos
    state["pos_embed"] = np.concatenate([cls_pos, state["pos_embed"]], axis=1)
    state["mask_token"] = np.zeros((1, state["cls_token"].shape[-1]), np.float32)
    path = tmp_path / "dinov2_reg_meta.safetensors"
    save_file(state, str(path))
    return path


def test_meta_dinov2_registers_load_as_timm_does(tmp_path, golden):
    path = _meta_dinov2_reg(tmp_path)
    assert checkpoints.read_backbone(str(path), 3)[1] == "bicubic"
    spec = CASES["dinov2_reg_safetensors"]
    model = _model("dinov2_reg_safetensors")
    variables = _init(model, spec["image_size"])
    loaded = checkpoints.load(str(path), variables, image_size=spec["image_size"], dont_load=())
    logits = model.apply(loaded, golden["dinov2_reg_safetensors/images"])
    np.testing.assert_allclose(logits, golden["dinov2_reg_safetensors/logits"], atol=1e-5,
                               rtol=1e-5)


def test_loading_resamples_by_the_rule(golden):
    # A 4x4 big_vision grid into a 6x6 model: big_vision's rule by default, another on request.
    model = _model("bv_npz")
    variables = _init(model, 48)
    path = str(GOLDEN / "bv_vit.npz")
    stored = checkpoints.read_backbone(path, 4)[0]["pos_embedding"].reshape(4, 4, -1)
    for rule, requested in (("bilinear_corners", "auto"), ("bicubic", "bicubic")):
        loaded = checkpoints.load(path, variables, image_size=48, resample_rule=requested)
        np.testing.assert_allclose(
            loaded["params"]["pos_embedding"].reshape(6, 6, -1),
            resample.resample_grid(stored, (6, 6), rule), atol=1e-6)
    with pytest.raises(ValueError, match="posemb_resample='area'"):
        checkpoints.load(path, variables, image_size=48, resample_rule="area")


@pytest.mark.parametrize("case,overrides,hint", [
    ("siglip_map_npz", dict(pool_type="tok", class_token=True), "model.pool_type='map'"),
    ("siglip_map_safetensors", dict(pool_type="gap"), "model.pool_type='map'"),
    ("bv_npz", dict(pool_type="map", class_token=True), "no MAP head: model.pool_type='tok'"),
    ("dinov2_reg_safetensors", dict(num_registers=0), "model.num_registers=2"),
    ("dinov2_safetensors", dict(num_registers=4), "model.num_registers=0"),
])
def test_architecture_mismatch_names_the_option(case, overrides, hint):
    spec = CASES[case]
    model = _model(case, **overrides)
    variables = _init(model, spec["image_size"])
    with pytest.raises(CheckpointError) as e:
        checkpoints.load(str(GOLDEN / spec["file"]), variables, image_size=spec["image_size"])
    assert hint in str(e.value)


def test_split_subtree():
    assert checkpoints.split_subtree("a/b.npz:img") == ("a/b.npz", "img")
    assert checkpoints.split_subtree("gs://bucket/b.npz") == ("gs://bucket/b.npz", None)
    assert checkpoints.split_subtree("gs://bucket/b.npz:img") == ("gs://bucket/b.npz", "img")
    assert checkpoints.split_subtree("https://h:8080/b.npz") == ("https://h:8080/b.npz", None)


# --- bad input -------------------------------------------------------------------------------


def _variables(case="bv_npz", **overrides):
    model = _model(case, **overrides)
    return _init(model, CASES[case]["image_size"])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        checkpoints.load(str(tmp_path / "nope.npz"), _variables())


@pytest.mark.parametrize("name", ["bv_vit.npz", "timm_vit.pth", "clip_vit.safetensors"])
def test_truncated_file(tmp_path, name):
    data = (GOLDEN / name).read_bytes()
    bad = tmp_path / name
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{name}.*(truncated|corrupt)"):
        checkpoints.load(str(bad), _variables())


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.npz"
    bad.write_text("these are not weights")
    with pytest.raises(CheckpointError, match="notes.npz: not a recognised checkpoint"):
        checkpoints.load(str(bad), _variables())
    other = tmp_path / "other.npz"
    np.savez(other, foo=np.zeros(3))
    with pytest.raises(CheckpointError, match="other.npz: no ViT found.*'foo'"):
        checkpoints.load(str(other), _variables())


def test_two_tower_file_without_subtree_says_append_img():
    path = GOLDEN / CASES["siglip_img_npz"]["file"].split(":")[0]
    with pytest.raises(CheckpointError, match="append ':img'"):
        checkpoints.load(str(path), _variables())


def test_wrong_variant_names_what_the_checkpoint_looks_like(tmp_path):
    # A ViT-Ti/16 (width 192, depth 12) big_vision file, loaded into a tiny model.
    flat = {"embedding/kernel": np.zeros((16, 16, 3, 192), np.float32)}
    for i in range(12):
        flat[f"Transformer/encoderblock_{i}/LayerNorm_0/scale"] = np.ones(192, np.float32)
    path = tmp_path / "ti16.npz"
    np.savez(path, **flat)
    with pytest.raises(CheckpointError, match=r"checkpoint is ViT-Ti/16 .*but the model is"):
        checkpoints.load(str(path), _variables())
    # Same width, other depth.
    with pytest.raises(CheckpointError, match="depth 2.*depth 3|depth 3.*depth 2"):
        checkpoints.load(str(GOLDEN / "bv_scan_bf16.npz"), _variables("bv_scan_bf16_npz",
                                                                      depth=2))


def test_unknown_and_missing_keys_are_listed(tmp_path):
    # The DINOv2 file has LayerScale; a model without it reports the unknown keys and the cause.
    spec = CASES["dinov2_safetensors"]
    with pytest.raises(CheckpointError) as e:
        checkpoints.load(str(GOLDEN / spec["file"]), _variables("dinov2_safetensors",
                                                                layerscale=False))
    msg = str(e.value)
    assert "Transformer/encoderblock_0/LayerScale_0/scale" in msg
    assert "layerscale=True" in msg
    # A model with LayerScale loading a file without it: missing keys.
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: .*LayerScale_0"):
        checkpoints.load(str(GOLDEN / "bv_vit.npz"), _variables(layerscale=True))
    # A key the model does not know at all.
    with np.load(GOLDEN / "bv_vit.npz") as z:
        flat = {k: z[k] for k in z.files}
    flat["params/Transformer/encoderblock_0/Extra_0/kernel"] = np.zeros(3, np.float32)
    path = tmp_path / "extra.npz"
    np.savez(path, **flat)
    with pytest.raises(CheckpointError, match="does not have: .*Extra_0/kernel"):
        checkpoints.load(str(path), _variables())


def test_image_size_not_a_multiple_of_patch():
    with pytest.raises(ValueError, match="image_size 30x30 is not a multiple of the patch size"):
        checkpoints.load(str(GOLDEN / "bv_vit.npz"), _variables(), image_size=30)


def test_loaded_model_at_another_resolution_runs():
    # bv_vit.npz is a 4x4 grid; a model at 48px has a 6x6 grid and gets a resampled embedding.
    model = _model("bv_npz")
    variables = _init(model, 48)
    loaded = checkpoints.load(str(GOLDEN / "bv_vit.npz"), variables, image_size=48)
    assert loaded["params"]["pos_embedding"].shape == (1, 36, 48)
    out = model.apply(loaded, jnp.zeros((1, 48, 48, 3)))
    assert np.all(np.isfinite(out))


def test_torch_reader_runs_no_code(tmp_path):
    """A pickle that would call os.system must come back as inert data, not execute."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(CheckpointError):
        checkpoints.load(str(path), _variables())
    assert not (tmp_path / "pwned").exists()


def test_https_download_is_cached_atomically(tmp_path, monkeypatch):
    """An http(s) path is downloaded (here from a loopback server) into the cache, once."""
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(GOLDEN / "bv_vit.npz", served / "bv_vit.npz")
    monkeypatch.setenv("VQT_JAX_CACHE", str(tmp_path / "cache"))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(served), **kw)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/bv_vit.npz"
        loaded = checkpoints.load(url, _variables())
        cached = list((tmp_path / "cache").rglob("*"))
        assert [p.name for p in cached if p.is_file()] == ["bv_vit.npz"]
        (served / "bv_vit.npz").unlink()  # the second load comes from the cache
        again = checkpoints.load(url, _variables())
        np.testing.assert_array_equal(loaded["params"]["cls"], again["params"]["cls"])
        with pytest.raises(CheckpointError, match="Could not download"):
            checkpoints.load(url.replace("bv_vit", "missing"), _variables())
        assert not [p for p in (tmp_path / "cache").rglob("*.part")]
    finally:
        server.shutdown()


def test_read_bf16_void_npz():
    kind, flat = files.read(str(GOLDEN / "bv_scan_bf16.npz"))
    assert kind == "npz"
    assert all(str(v.dtype) == "bfloat16" for v in flat.values() if v.dtype.kind != "i")
