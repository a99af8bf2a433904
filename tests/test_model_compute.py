"""The ViT's compute options: compute dtype, fused self-attention, scanned blocks and remat.

Each option changes how the model computes, never what: the parameter tree stays big_vision's
per-block layout, and in float32 the results are the default path's to float rounding.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqt_jax import trainable as trainable_lib
from vqt_jax.models import ViT, vit
from vqt_jax.training import train_step

TINY = dict(patch_size=(8, 8), width=32, depth=2, mlp_dim=64, num_heads=2, num_classes=5)
# The kinds of variables a scan has to stack per block (params, and another collection:
# the adapters') or feed per layer (queries, VPT-deep prompts); dropouts off, so train mode is
# deterministic and comparable.
PARTS = dict(num_queries=2, query_dropout=0.0, num_prompts=2, deep_prompts=True,
             prompt_dropout=0.0, adapter_dim=4, adapter_dropout=0.0)
IMAGE = 16
COMPUTE_OPTIONS = [dict(scan_blocks=True), dict(remat=True), dict(scan_blocks=True, remat=True)]
# Compiling is most of these tests' time on CPU, and LLVM's optimisation of the machine code is
# most of compiling: without it compiles take half as long, the programs (XLA's optimised HLO)
# are the same and the results equal to rounding.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run(fn, *args):
    """fn(*args), compiled with FAST_COMPILE."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def _images(seed=0, batch=2, size=IMAGE):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def _random_variables(model, size, seed=1, scale=0.2):
    """Non-trivial values for every variable (a fresh init has a zero head and cls),
    drawn on the host from the init's shapes: nothing is compiled."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), _images(size=size))
    rng = np.random.default_rng(seed)
    out = {}
    for name, v in sorted(trainable_lib.flatten(shapes).items()):
        noise = scale * rng.standard_normal(v.shape).astype(np.float32)
        out[name] = jnp.asarray((1.0 + noise) if name.endswith("/scale") else noise, v.dtype)
    return trainable_lib.unflatten(out)


@functools.cache
def _variables():
    # One set of values for every model built from TINY and PARTS: the options add no variables.
    return _random_variables(ViT(**TINY, **PARTS), IMAGE)


def _walk(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it (jit, scan, remat, custom_vjp)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                if hasattr(sub, "eqns"):
                    yield from _walk(sub)
                elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from _walk(sub.jaxpr)


def _matmul_dtypes(fn, *args):
    """(lhs dtype, rhs dtype, rhs shape) of every dot_general and convolution fn traces."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return [(e.invars[0].aval.dtype, e.invars[1].aval.dtype, e.invars[1].aval.shape)
            for e in _walk(jaxpr) if e.primitive.name in ("dot_general", "conv_general_dilated")]


def _assert_bf16_but_head(matmuls, head_shape):
    """All matmuls take bfloat16 operands, except exactly one: the float32 head."""
    f32 = [m for m in matmuls if m[:2] == (jnp.float32, jnp.float32)]
    bf16 = [m for m in matmuls if m[:2] == (jnp.bfloat16, jnp.bfloat16)]
    assert f32 == [(jnp.float32, jnp.float32, head_shape)], f32
    assert len(bf16) == len(matmuls) - 1, matmuls
    return bf16


def _kv(cached):
    """What a key/value cache keeps and from_cache reads (with `pre_logits` in it, from_cache
    would run only the head on those)."""
    return {k: cached[k] for k in ("k", "v", "cls")}


def _outputs(model, variables, images):
    """Logits, cache_features and from_cache's logits on them, in one program."""
    cached = model.apply(variables, images, method="cache_features")
    return (model.apply(variables, images), cached,
            model.apply(variables, _kv(cached), method="from_cache"))


def test_bfloat16_compute_float32_params_and_logits():
    variables = _variables()
    images = _images(4)
    narrow = ViT(**TINY, **PARTS, dtype="bfloat16")

    # Parameters (and every other variable) stay float32.
    shapes = jax.eval_shape(narrow.init, jax.random.key(0), images)
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}

    want = _default_results()  # float32 (the default model), on the same images
    logits32, cached32, from_cache32 = want["logits"], want["cached"], want["cache_logits"]
    logits16, cached16, from_cache16 = _run(functools.partial(_outputs, narrow), variables,
                                            images)

    # The backbone's and the query path's matmuls (patch embedding, q/k/v/out projections,
    # both attentions, MLPs, adapters) run in bfloat16, unrolled or scanned, from
    # images or from a cache; only the head's is float32.
    head = (narrow.feature_dim, TINY["num_classes"])
    for scan in (False, True):
        model = narrow.clone(scan_blocks=scan)
        bf16 = _assert_bf16_but_head(_matmul_dtypes(model.apply, variables, images), head)
        assert len(bf16) >= 10
        _assert_bf16_but_head(_matmul_dtypes(
            functools.partial(model.apply, method="from_cache"), variables, _kv(cached32)), head)

    scale = float(jnp.abs(logits32).max())
    for got in (logits16, from_cache16):
        assert got.dtype == jnp.float32
        assert not np.array_equal(got, logits32)  # really computed in bfloat16
        np.testing.assert_allclose(got, logits32, atol=0.05 * scale)
    np.testing.assert_allclose(from_cache32, logits32, atol=1e-5, rtol=1e-5)

    # Per-token outputs in the compute dtype, per-image features in float32.
    assert cached16["k"].dtype == cached16["v"].dtype == jnp.bfloat16
    for key in ("cls", "pooled", "pre_logits"):
        assert cached16[key].dtype == jnp.float32, key
        tol = 0.05 * float(jnp.abs(cached32[key]).max())
        np.testing.assert_allclose(cached16[key], cached32[key], atol=tol, err_msg=key)


def test_one_path_per_use_gives_the_same_features():
    """The query path over cached keys/values gives the backbone pass's query outputs, and
    `features_without_blocks` is `features` less `blocks`."""
    model = ViT(**TINY, **PARTS)
    variables, images = _variables(), _images()

    def paths(v, x):
        cached = model.apply(v, x, method="cache_features")
        return (model.apply(v, x, method="features"),
                model.apply(v, x, method="features_without_blocks"),
                model.apply(v, cached["k"], cached["v"], method="queries_from_kv"))

    full, without, queries = _run(paths, variables, images)
    assert set(full) - set(without) == {"blocks"}
    _assert_trees_close({k: full[k] for k in without}, without)
    np.testing.assert_allclose(queries, full["queries"], atol=1e-5, rtol=1e-5)


def test_dtype_by_name_or_dtype_and_bad_dtypes():
    images = _images()
    variables = _variables()
    by_name = ViT(**TINY, **PARTS, dtype="bfloat16")
    by_dtype = ViT(**TINY, **PARTS, dtype=jnp.bfloat16)
    assert by_name.compute_dtype == by_dtype.compute_dtype == jnp.bfloat16
    # The same program either way.
    programs = [str(jax.make_jaxpr(m.apply)(variables, images)) for m in (by_name, by_dtype)]
    assert programs[0] == programs[1]
    for bad, match in (("bfloat17", "is not a dtype"), ("int8", "floating-point")):
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(ViT(**TINY, dtype=bad).init, jax.random.key(0), images)


def _reference_blocks(params, images, patch, eps=1e-6):
    """Every block's ordinary-token output of a plain class-token ViT, in plain einsums."""

    def ln(p, x):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p["scale"] \
            + p["bias"]

    def proj(p, x):
        return jnp.einsum("bnd,dhk->bnhk", x, p["kernel"]) + p["bias"]

    b = images.shape[0]
    e = params["embedding"]
    x = jax.lax.conv_general_dilated(images, e["kernel"], (patch, patch), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + e["bias"]
    x = x.reshape(b, -1, x.shape[-1]) + params["pos_embedding"]
    x = jnp.concatenate([jnp.broadcast_to(params["cls"], (b, 1, x.shape[-1])), x], axis=1)
    outs = []
    for i in range(len([k for k in params["Transformer"] if k.startswith("encoderblock_")])):
        p = params["Transformer"][f"encoderblock_{i}"]
        a = p["MultiHeadDotProductAttention_0"]
        y = ln(p["LayerNorm_0"], x)
        q, k, v = (proj(a[n], y) for n in ("query", "key", "value"))
        probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]), -1)
        o = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        x = x + jnp.einsum("bqhd,hdo->bqo", o, a["out"]["kernel"]) + a["out"]["bias"]
        m = p["MlpBlock_0"]
        h = jax.nn.gelu(ln(p["LayerNorm_1"], x) @ m["Dense_0"]["kernel"] + m["Dense_0"]["bias"],
                        approximate=True)
        x = x + h @ m["Dense_1"]["kernel"] + m["Dense_1"]["bias"]
        outs.append(x)
    return jnp.stack(outs, axis=1)


@pytest.mark.parametrize("attention", ["xla", "heads_major", "auto"])
def test_each_self_attention_equals_the_einsums(monkeypatch, attention):
    """'xla' is jax.nn.dot_product_attention's, 'heads_major' our einsums, and 'auto' on CPU
    the einsums; all equal the reference."""
    model = ViT(**dict(TINY, num_classes=None), attention=attention)
    variables = {"params": {k: v for k, v in _variables()["params"].items() if k != "head"}}
    images = _images(3)
    calls = []
    real = jax.nn.dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", counting)
    blocks = _run(functools.partial(model.apply, method="features"), variables, images)["blocks"]
    if attention == "xla":
        assert len(calls) == TINY["depth"]  # one per block, traced once under jit
        assert all(c.get("implementation") == "xla" for c in calls)
    else:
        assert not calls
    reference = _run(functools.partial(_reference_blocks, patch=8), variables["params"], images)
    np.testing.assert_allclose(blocks, reference, atol=1e-5, rtol=1e-5)


# (backend, CUDA compute capability), compute dtype, head dim -> what 'auto' runs.
AUTO_ATTENTION = [
    (("cpu", (0, 0)), "bfloat16", 64, "heads_major"),
    (("cpu", (0, 0)), "float32", 64, "heads_major"),
    (("gpu", (8, 0)), "bfloat16", 64, "cudnn"),
    (("gpu", (9, 0)), "float16", 256, "cudnn"),  # up to 256 from Hopper
    (("gpu", (8, 6)), "bfloat16", 256, "xla"),  # up to 128 before it
    (("gpu", (9, 0)), "bfloat16", 60, "xla"),  # not a multiple of 8
    (("gpu", (9, 0)), "float32", 64, "xla"),
    (("gpu", (7, 5)), "bfloat16", 64, "xla"),  # before Ampere
    (("gpu", (10, 3)), "bfloat16", 64, "xla"),  # needs a cuDNN version 'auto' does not check
    (("gpu", (0, 0)), "bfloat16", 64, "xla"),  # not CUDA
    (("tpu", (0, 0)), "bfloat16", 64, "xla"),
]


@pytest.mark.parametrize("platform,dtype,head_dim,want", AUTO_ATTENTION)
def test_auto_attention_picks_cudnn_only_where_it_applies(monkeypatch, platform, dtype,
                                                          head_dim, want):
    monkeypatch.setattr(vit, "_platform", lambda: platform)
    assert vit.attention_implementation("auto", dtype, head_dim) == want
    for explicit in ("xla", "cudnn", "heads_major"):  # an explicit choice is kept as is
        assert vit.attention_implementation(explicit, dtype, head_dim) == explicit


def test_the_model_runs_the_resolved_attention_and_an_explicit_cudnn_has_no_fallback(
        monkeypatch):
    images = _images()
    variables = _variables()
    calls = []
    real = jax.nn.dot_product_attention

    def recording(*args, implementation=None, **kwargs):  # records, computes with XLA's
        calls.append(implementation)
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(vit, "_platform", lambda: ("gpu", (9, 0)))
    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    for dtype, want in (("bfloat16", "cudnn"), ("float32", "xla")):
        calls.clear()
        jax.eval_shape(ViT(**TINY, **PARTS, dtype=dtype).apply, variables, images)
        assert calls == [want] * TINY["depth"], dtype
    monkeypatch.undo()
    if jax.default_backend() == "cpu":  # where cuDNN cannot run, 'cudnn' fails with JAX's error
        with pytest.raises(RuntimeError, match="cuDNN"):
            jax.eval_shape(ViT(**TINY, attention="cudnn", dtype="bfloat16").apply, variables,
                           images)
    with pytest.raises(ValueError, match="Unknown attention 'flash'; choose from auto, xla"):
        jax.eval_shape(ViT(**TINY, attention="flash").apply, variables, images)


def _results(model, variables, images):
    """In one program: train-mode logits and the gradients of a fixed readout of them w.r.t.
    every variable (queries, prompts, LoRA, adapters, head and the backbone's params); and
    cache_features, with from_cache's logits and gradients w.r.t. the queries and the head
    (what trains on a cache)."""
    readout = jax.random.normal(jax.random.key(9), (images.shape[0], TINY["num_classes"]))

    def call_loss(v):
        logits = model.apply(v, images, train=True)
        return jnp.sum(logits * readout), logits

    cached = model.apply(variables, images, method="cache_features")

    def cache_loss(queries, head):
        v = {**variables, "queries": queries, "params": {**variables["params"], "head": head}}
        logits = model.apply(v, _kv(cached), method="from_cache")
        return jnp.sum(logits * readout), logits

    (_, logits), grads = jax.value_and_grad(call_loss, has_aux=True)(variables)
    (_, cache_logits), cache_grads = jax.value_and_grad(cache_loss, (0, 1), has_aux=True)(
        variables["queries"], variables["params"]["head"])
    return dict(logits=logits, grads=grads, cached=cached, cache_logits=cache_logits,
                cache_grads=cache_grads)


@functools.cache
def _default_results():
    return _run(functools.partial(_results, ViT(**TINY, **PARTS)), _variables(), _images(4))


def _assert_trees_close(a, b, tol=1e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                            strict=True):
        np.testing.assert_allclose(x, y, atol=tol, rtol=tol, err_msg=jax.tree_util.keystr(path))


def _primitives(fn, *args):
    return {e.primitive.name for e in _walk(jax.make_jaxpr(fn)(*args).jaxpr)}


@pytest.mark.parametrize("options", COMPUTE_OPTIONS, ids=lambda o: "+".join(o))
def test_scan_and_remat_keep_the_tree_and_change_the_program(options):
    model, default = ViT(**TINY, **PARTS, **options), ViT(**TINY, **PARTS)
    images = _images()
    # The same variable tree (names, shapes, dtypes): checkpoints, trainable rules and
    # optimiser states never see the options.
    shapes = [jax.eval_shape(m.init, jax.random.key(0), images) for m in (model, default)]
    assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])
    assert jax.tree.leaves(shapes[0]) == jax.tree.leaves(shapes[1])
    # ... while the program does scan over the blocks and rematerialise them as asked.
    variables = _variables()
    cached = _kv(jax.eval_shape(functools.partial(default.apply, method="cache_features"),
                                variables, images))
    for method, arg, kw in (("__call__", images, {"train": True}), ("cache_features", images, {}),
                            ("from_cache", cached, {})):
        # (train mode: remat must keep `train` a Python bool; the dropouts are 0, no rng needed)
        found = _primitives(functools.partial(model.apply, method=method, **kw), variables, arg)
        assert ("scan" in found) == bool(options.get("scan_blocks")), (method, found)
        if method == "__call__":  # the cache's query path has no ordinary stream to remat
            remat = bool(found & {"checkpoint", "remat", "remat2"})  # its name varies
            assert remat == bool(options.get("remat")), found


def test_scan_and_remat_same_outputs_and_gradients():
    """Both options at once: the scan applies the rematerialised block, so every code path
    of either option runs here (each option's own wiring is checked above)."""
    model = ViT(**TINY, **PARTS, scan_blocks=True, remat=True)
    got = _run(functools.partial(_results, model), _variables(), _images(4))
    want = _default_results()
    assert float(jnp.abs(got["grads"]["queries"]["tokens"]).max()) > 1e-3  # not trivially 0
    assert float(jnp.abs(got["cache_grads"][0]["tokens"]).max()) > 1e-3
    for key in ("logits", "grads", "cached", "cache_logits", "cache_grads"):
        _assert_trees_close(got[key], want[key])


def test_scan_with_adapter_dropout_and_sown_attention():
    # Train mode draws one dropout key per layer inside the scan; remat keeps `train` static.
    model = ViT(**dict(TINY, num_classes=None), adapter_dim=4, adapter_dropout=0.5,
                scan_blocks=True, remat=True)
    variables = _random_variables(model, IMAGE)
    images = _images()
    run = jax.jit(lambda key: model.apply(variables, images, train=True, rngs={"dropout": key}))
    run = run.lower(jax.random.key(0)).compile(compiler_options=FAST_COMPILE)
    a, b = run(jax.random.key(0)), run(jax.random.key(1))
    assert np.isfinite(a).all() and not np.array_equal(a, b)
    # Sown query attention keeps its per-block names (such forwards run the unrolled loop).
    model = ViT(**TINY, **PARTS, scan_blocks=True)
    _, state = jax.eval_shape(functools.partial(model.apply, mutable=["intermediates"]),
                              _variables(), images)
    sown = state["intermediates"]["Transformer"]
    assert sorted(sown) == ["encoderblock_0", "encoderblock_1"]
    assert sown["encoderblock_0"]["query_attention"][0].shape == (2, 2, 2, 1 + 2 + 4)


def _flops(fn, *args) -> float:
    # XLA's estimate for the lowered (not yet optimised) program: no compilation, and it
    # already holds whatever backward autodiff emitted, which is what is measured here.
    analysis = jax.jit(fn).lower(*args).cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0]
    return float(analysis["flops"])


def test_vqt_backward_still_skips_the_backbone_with_scan_and_remat():
    """tests/test_model.py's flop measure, with both options: VQT's gradient still costs about
    one forward (remat only wraps the ordinary stream, which VQT does not differentiate), and
    remat does recompute the backbone when the backbone is trained. (The unrolled loop applies
    the same rematerialised block, and costs too much compiling to measure it as well here.)

    Measured (CPU, XLA's cost analysis of the lowered programs; a scan's body counts once,
    in both programs of a ratio): vqt 1.010, full 3.24 (2.67 with scan_blocks alone; 1.011
    and 3.47 with remat alone; the default's full is 2.79).
    """
    model = ViT(**TINY, num_queries=1, scan_blocks=True, remat=True)
    variables = _random_variables(model, 64)
    loss_fn = train_step.make_loss_fn(model)
    batch = {"image": _images(7, batch=4, size=64), "label": jnp.array([0, 1, 2, 3])}

    def flops(method: str, grad: bool) -> float:
        trainable, frozen = trainable_lib.partition(variables, trainable_lib.rule_for(method))

        def loss(t):
            return loss_fn(t, frozen, batch, jax.random.key(0))[0]

        return _flops(jax.value_and_grad(loss) if grad else loss, trainable)

    # Unoptimised, the forward is the same program whatever is trained.
    forward = flops("vqt", grad=False)
    vqt, full = flops("vqt", grad=True) / forward, flops("full", grad=True) / forward
    assert vqt < 1.25, vqt
    # A backbone's backward is ~2x its forward; remat adds a recomputed forward to it.
    assert full > 3.0, full
