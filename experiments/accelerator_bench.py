"""VQT's speed and memory on one accelerator (or CPU): forward, train steps, cached epoch.

    python experiments/accelerator_bench.py --json experiments/results/accelerator_<device>.json
    python experiments/accelerator_bench.py --tiny --json /tmp/bench.json   # seconds, any CPU

For ViT-B/16 at 224 (random weights and inputs: time does not depend on the values) and the
largest batch of `--batches` whose VQT train step fits the device (by the compiled step's
`memory_analysis()`; every candidate on a device that does not report its memory), it reports:
  * forward_img_s: the inference forward (images -> logits), float32 and bfloat16 compute;
  * vqt_step_uncached_img_s: a VQT train step from images (backbone forward, query path
    forward and backward, optimiser);
  * vqt_step_cached_img_s: a VQT train step from the device-resident cache, inside the
    training loop's compiled chunk (`training.engine.Engine`: indices drawn and rows
    gathered on the device);
  * epoch_s: a whole epoch of `--epoch_images` (1000: VTAB-1k's train800val200) both ways,
    uncached (that many steps of the uncached step) and cached (one chunk), and their ratio;
  * stage_training: a protocol stage's training at the protocol's batch (`--stage_batch`,
    128) over a `--epoch_images` cache: one run as the protocol trains each run on its own
    (a stack of one), against the release's 20-point grid as one program (one shared example
    order) and its 5 seeds as one program (each its own order; `engine.Engine`, as
    `training.stacked` runs them): each one's first epoch (compilation included) and the median
    epoch after it, how much faster the program trains its runs than they train one by one,
    and the FLOPs of one run's step (counted as for the forward) and the FLOP/s achieved;
  * memory: the compiled memory (arguments, outputs, temporaries) of the VQT step and of full
    fine-tuning's step at the same batch;
  * flops: the forward's FLOPs per image (XLA's cost analysis of the program compiled for the
    CPU: a GPU's leaves its cuBLAS/cuDNN calls out) and its achieved FLOP/s, as a
    fraction of the device's dense peak for that dtype where the peak is in `PEAKS` (the
    vendor's datasheet figure, dense, no sparsity; stated in the JSON).
Times are medians of `--repeats` timed calls after a warm-up (each call waits for its
result). Everything needs only jax, flax, optax and numpy (no TensorFlow).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vqt_jax import cache as cache_lib  # noqa: E402
from vqt_jax import costs, device_cache  # noqa: E402
from vqt_jax import trainable as trainable_lib  # noqa: E402
from vqt_jax.models import create_model  # noqa: E402
from vqt_jax.timing import median_seconds  # noqa: E402
from vqt_jax.training import engine, optim, train_step  # noqa: E402
from vqt_jax.training.mesh import make_mesh  # noqa: E402

# Dense peak FLOP/s by device kind (substring, first match) and compute dtype, from the
# vendors' datasheets (no structured sparsity). float32 on NVIDIA is the TF32 tensor-core
# figure, which XLA uses for float32 matmuls at default precision.
PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bfloat16": 989e12, "float32": 494e12}),
    ("H100", {"bfloat16": 989e12, "float32": 494e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("L4", {"bfloat16": 121e12, "float32": 60e12}),
    ("TPU v4", {"bfloat16": 275e12}),
    ("TPU v5 lite", {"bfloat16": 197e12}),
    ("TPU v5p", {"bfloat16": 459e12}),
    ("TPU v6 lite", {"bfloat16": 918e12}),
]
TINY = dict(variant=None, patch_size=(8, 8), width=32, depth=2, mlp_dim=64, num_heads=2)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    for name, peaks in PEAKS:
        if name.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


def memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    return {"argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes),
            "total_bytes": int(m.argument_size_in_bytes + m.output_size_in_bytes
                               + m.temp_size_in_bytes - m.alias_size_in_bytes)}


class Bench:
    """The model, its states and its jitted functions at one batch size."""

    def __init__(self, args: argparse.Namespace, batch: int, variables: Any = None):
        self.args, self.batch = args, batch
        self.mesh = make_mesh()
        self.replicated = NamedSharding(self.mesh, P())
        self.sharded = NamedSharding(self.mesh, P("data"))
        kwargs = TINY if args.tiny else {"variant": args.variant}
        self.kwargs = {**kwargs, "num_classes": args.num_classes,
                       "num_queries": args.num_queries}
        self.model = create_model(**self.kwargs)
        self.images = jax.ShapeDtypeStruct((batch, args.image_size, args.image_size, 3),
                                           jnp.float32, sharding=self.sharded)
        # The variables do not depend on the batch: the batch search initialises them once.
        self.variables = variables if variables is not None else jax.jit(
            self.model.init, out_shardings=self.replicated)(
                jax.random.key(0), jnp.zeros((1, args.image_size, args.image_size, 3)))

    def image_batch(self) -> dict[str, jax.Array]:
        shape = self.images.shape
        x = jax.device_put(np.random.default_rng(0).normal(size=shape).astype(np.float32),
                           self.sharded)
        y = jax.device_put(np.arange(shape[0], dtype=np.int32) % self.args.num_classes,
                           self.sharded)
        return {"image": x, "label": y}

    def state_step(self, method: str, from_cache: bool = False):
        """(jitted state step, its initial state, frozen) for `method` ('vqt' or 'full')."""
        trainable, frozen = trainable_lib.partition(self.variables,
                                                    trainable_lib.rule_for(method))
        schedule = optax.constant_schedule(1e-3)
        tx = optim.make_optimizer(schedule, 1e-4, trainable, "adam")  # VQT release
        step = train_step.make_state_step(
            train_step.make_train_step(train_step.make_loss_fn(self.model, from_cache), tx),
            schedule)
        # One compiled init; its copies of the leaves are the state's (the step donates it).
        state = jax.jit(lambda t: train_step.TrainState(
            jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, t), tx.init(t)),
            out_shardings=self.replicated)(trainable)
        return step, state, frozen

    def jit_step(self, step):
        r = self.replicated
        return jax.jit(step, in_shardings=(r, r, self.sharded, r), out_shardings=(r, r),
                       donate_argnums=(0,))

    def vqt_step_memory(self, method: str = "vqt") -> dict[str, int]:
        step, state, frozen = self.state_step(method)
        batch = {"image": self.images,
                 "label": jax.ShapeDtypeStruct((self.batch,), jnp.int32, sharding=self.sharded)}
        compiled = self.jit_step(step).lower(state, frozen, batch, jax.random.key(0)).compile()
        return memory(compiled)


def fits(total_bytes: int, device: Any) -> bool:
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - backends without memory stats
        limit = None
    return limit is None or total_bytes <= 0.9 * limit


def choose_batch(args: argparse.Namespace) -> tuple[Bench, list[dict]]:
    """The bench at the largest candidate batch whose compiled VQT step fits the device."""
    tried, best, variables = [], None, None
    for batch in args.batches:
        if batch % len(jax.devices()):
            continue
        bench = Bench(args, batch, variables)
        variables = bench.variables
        mem = bench.vqt_step_memory()
        ok = fits(mem["total_bytes"], jax.devices()[0])
        tried.append({"batch": batch, "vqt_step_total_bytes": mem["total_bytes"], "fits": ok})
        if not ok:
            break
        best = bench
    if best is None:
        raise SystemExit(f"error: no batch of {args.batches} fits the device")
    return best, tried


def flops_per_image(bench: Bench) -> float:
    """The float32 inference forward's FLOPs per image (`costs.forward_flops`, counted on the
    CPU: a GPU's count leaves cuBLAS/cuDNN calls out; the same arithmetic in any dtype)."""
    return costs.forward_flops(create_model(**bench.kwargs), bench.variables,
                               bench.args.image_size)


def forward(bench: Bench, dtype: str, repeats: int, flops: float) -> dict[str, Any]:
    """The inference forward's speed in `dtype`, and its FLOP/s (`flops` per image)."""
    model = create_model(**bench.kwargs, dtype=dtype)
    fn = jax.jit(lambda v, x: model.apply(v, x), in_shardings=(bench.replicated, bench.sharded))
    compiled = fn.lower(bench.variables, bench.images).compile()
    x = bench.image_batch()["image"]
    seconds = median_seconds(lambda: compiled(bench.variables, x), repeats)
    achieved = flops * bench.batch / seconds
    out: dict[str, Any] = {"img_s": bench.batch / seconds, "step_s": seconds,
                           "gflops_per_image": flops / 1e9, "achieved_tflop_s": achieved / 1e12}
    peak = peak_flops(jax.devices()[0].device_kind, dtype)
    if peak:
        out |= {"peak_tflop_s_assumed": peak / 1e12, "fraction_of_peak": achieved / peak}
    return out


def uncached(bench: Bench, repeats: int, epoch_steps: int) -> dict[str, float]:
    step, state, frozen = bench.state_step("vqt")
    fn, batch, rng = bench.jit_step(step), bench.image_batch(), jax.random.key(0)
    box = [state]

    def one():
        box[0], metrics = fn(box[0], frozen, batch, rng)
        return metrics["loss"]

    def epoch():
        for _ in range(epoch_steps):
            loss = one()
        return loss

    seconds = median_seconds(one, repeats)
    return {"step_img_s": bench.batch / seconds, "step_s": seconds,
            "epoch_s": median_seconds(epoch, max(1, repeats // 4))}


def random_cache(bench: Bench, num_examples: int, cache_dtype: str):
    """A device cache of `num_examples` random rows of the model's K/V cache, held as
    `device_cache.upload` holds a real one; (cache, its fields, its spec)."""
    spec = cache_lib.spec_for(bench.model, "kv", num_examples, bench.args.image_size,
                              cache_dtype)
    fields = ["k", "v", "cls"]
    mesh, d = bench.mesh, bench.mesh.shape["data"]
    blocks = math.ceil(num_examples / d)
    dtypes = {name: np.dtype(cache_lib._np_dtype(spec.fields[name][1])) for name in fields}

    def make(key: jax.Array) -> dict[str, jax.Array]:
        out = {}
        for i, name in enumerate(fields):
            shape, _ = spec.fields[name]
            x = jax.random.normal(jax.random.fold_in(key, i), (blocks, d, *shape),
                                  jnp.float32).astype(dtypes[name])
            # 16-bit floats as bit patterns, as `device_cache.upload` holds them.
            out[name] = jax.lax.bitcast_convert_type(x, device_cache.stored_dtype(x.dtype))
        out["label"] = jnp.arange(blocks * d, dtype=jnp.int32).reshape(blocks, d) % (
            bench.args.num_classes)
        return out

    arrays = jax.jit(make, out_shardings=NamedSharding(mesh, P(None, "data")))(
        jax.random.key(0))
    cache = device_cache.DeviceCache(arrays, num_examples, mesh,
                                     {**dtypes, "label": np.dtype(np.int32)})
    return cache, fields, spec


def chunk_timer(advance: Callable, state: Any) -> Callable[[int], Callable[[], Any]]:
    """run(count) -> a call that advances the (donated) state by `count` steps."""
    box = [state]

    def run(count: int):
        def go():
            box[0], metrics = advance(box[0], count)
            return metrics
        return go

    return run


def program(bench: Bench, cache: device_cache.DeviceCache, fields: list[str], batch: int,
            max_steps: int, members: int = 1, own_orders: bool = False,
            unit: Callable[[Any], Any] = lambda s: 1.0) -> Callable[[int], Callable[[], Any]]:
    """`chunk_timer` of `members` VQT runs trained from `cache` as the training engine trains
    them (`engine.Engine` over a `DeviceSource`: one run is a stack of one), each with its own
    example order (`own_orders`) or one shared order."""
    trainable, frozen = trainable_lib.partition(bench.variables, trainable_lib.rule_for("vqt"))
    state = engine.init_state("adam", trainable, [trainable] * members, cache.mesh)
    loss = train_step.make_loss_fn(bench.model, from_cache=True)
    run = engine.Engine(
        engine.member_step(lambda t, m, f, b, r: loss(t, f, b, r), "adam", trainable, unit),
        engine.DeviceSource(cache, fields, batch, "epoch",
                            list(range(members)) if own_orders else [0] * members),
        frozen, {"lr": np.geomspace(1e-3, 1.0, members).astype(np.float32),
                 "wd": np.full(members, 1e-4, np.float32)},
        jax.random.split(jax.random.key(0), members), state, max_steps=max_steps)
    return chunk_timer(run.advance, state)


def cached(bench: Bench, repeats: int, num_examples: int, epoch_steps: int,
           cache_dtype: str) -> dict[str, Any]:
    """A cached epoch as the training loop runs it: one engine chunk of one run."""
    cache, fields, spec = random_cache(bench, num_examples, cache_dtype)
    run = program(bench, cache, fields, bench.batch, epoch_steps)
    step_s = median_seconds(run(1), repeats)
    epoch_s = median_seconds(run(epoch_steps), max(1, repeats // 4))
    return {"step_img_s": bench.batch / step_s, "step_s": step_s, "epoch_s": epoch_s,
            "cache_bytes": spec.nbytes, "cache_dtype": cache_dtype}


def first_and_median(name: str, build: Callable[[], Callable[[int], Callable[[], Any]]],
                     steps: int, repeats: int) -> dict[str, float]:
    """{first_epoch_s: building the stepper and its first epoch (compilation included),
    epoch_s: the median epoch after it}."""
    t = time.perf_counter()
    run = build()
    jax.block_until_ready(run(steps)())
    out = {"first_epoch_s": time.perf_counter() - t, "epoch_s": median_seconds(run(steps), repeats)}
    print(f"  {name}: first epoch {out['first_epoch_s']:.2f} s, then {out['epoch_s']:.4f} s",
          file=sys.stderr, flush=True)
    return out


def stage_training(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """A protocol stage's training: its runs one by one against them as one program."""
    batch, epochs, n = args.stage_batch, args.stage_epochs, args.epoch_images
    cache, fields, spec = random_cache(bench, n, args.cache_dtype)
    steps = math.ceil(n / batch)
    repeats = max(1, args.repeats // 2)
    unit, _ = optim.training_schedule(1.0, num_examples=n, batch_size=batch, epochs=epochs,
                                      warmup_epochs=epochs // 10, batching="epoch")

    # One run's step: a program's step does the arithmetic of its runs' steps.
    flops = costs.cached_step_flops(bench.model, bench.variables, spec, batch, method="vqt",
                                    optimizer="adam")
    single = first_and_median("one run", lambda: program(bench, cache, fields, batch, steps,
                                                         unit=unit), steps, repeats)
    single["achieved_tflop_s"] = flops * steps / single["epoch_s"] / 1e12
    out: dict[str, Any] = {"batch": batch, "epoch_images": n, "steps_per_epoch": steps,
                           "epochs": epochs, "gflops_per_run_step": flops / 1e9,
                           "one_run": single}
    for name, members, own in (("grid", 20, False), ("seeds", 5, True)):
        r = first_and_median(name, functools.partial(program, bench, cache, fields, batch, steps,
                                                     members, own, unit), steps, repeats)
        # A stage's training one by one: each run compiles and trains on its own.
        by_one = members * (single["first_epoch_s"] + (epochs - 1) * single["epoch_s"])
        together = r["first_epoch_s"] + (epochs - 1) * r["epoch_s"]
        out[name] = {**r, "members": members, "example_orders": members if own else 1,
                     "epoch_speedup": members * single["epoch_s"] / r["epoch_s"],
                     "stage_one_by_one_s": by_one, "stage_one_program_s": together,
                     "stage_speedup": by_one / together,
                     "achieved_tflop_s": members * flops * steps / r["epoch_s"] / 1e12}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    device = jax.devices()[0]
    bench, tried = (Bench(args, args.batches[0]), []) if args.tiny else choose_batch(args)
    batch = bench.batch
    print(f"setup and batch search: {time.perf_counter() - start:.1f} s", file=sys.stderr,
          flush=True)
    epoch_steps = math.ceil(args.epoch_images / batch)
    result: dict[str, Any] = {
        "device": device.device_kind, "platform": device.platform,
        "num_devices": len(jax.devices()), "jax": jax.__version__,
        "model": "tiny" if args.tiny else f"ViT-{args.variant}", "image_size": args.image_size,
        "num_queries": args.num_queries, "batch": batch, "batch_search": tried,
        "repeats": args.repeats,
    }
    sections = result["section_seconds"] = {}

    def timed(name: str, into: dict, key: str, fn: Callable[[], Any]) -> None:
        """Runs one section, stores its figures at into[key] and writes what is measured so
        far (marked partial), so that a run cut short keeps it."""
        t = time.perf_counter()
        into[key] = fn()
        sections[name] = time.perf_counter() - t
        print(f"{name}: {sections[name]:.1f} s", file=sys.stderr, flush=True)
        if args.json:
            write_json(args.json, {**result, "partial": True})

    timed("flops", result, "gflops_per_image_cpu_count", lambda: flops_per_image(bench) / 1e9)
    result["forward"] = {}
    for dt in ("float32", "bfloat16"):
        timed(f"forward_{dt}", result["forward"], dt, lambda dt=dt: forward(
            bench, dt, args.repeats, result["gflops_per_image_cpu_count"] * 1e9))
    timed("vqt_uncached", result, "vqt_uncached",
          lambda: uncached(bench, args.repeats, epoch_steps))
    timed("vqt_cached", result, "vqt_cached", lambda: cached(
        bench, args.repeats, args.epoch_images, epoch_steps, args.cache_dtype))
    timed("stage_training", result, "stage_training", lambda: stage_training(bench, args))
    result["epoch"] = {
        "images": args.epoch_images, "steps": epoch_steps,
        "uncached_s": result["vqt_uncached"]["epoch_s"],
        "cached_s": result["vqt_cached"]["epoch_s"],
        "speedup": result["vqt_uncached"]["epoch_s"] / result["vqt_cached"]["epoch_s"]}
    timed("memory", result, "memory", lambda: {
        "vqt_step": bench.vqt_step_memory("vqt"),
        "full_finetune_step": bench.vqt_step_memory("full")})
    result["seconds"] = time.perf_counter() - start
    return result


def parser() -> argparse.ArgumentParser:
    """The command line (README's commands are checked against it)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the figures here (one JSON object)")
    p.add_argument("--tiny", action="store_true", help="a tiny ViT at 32 px (tests, CPU)")
    p.add_argument("--variant", default="B/16")
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--num_queries", type=int, default=10)
    p.add_argument("--num_classes", type=int, default=100)
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help="candidate batch sizes, ascending (default 64 .. 1024)")
    p.add_argument("--epoch_images", type=int, default=None)
    p.add_argument("--cache_dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--stage_batch", type=int, default=None,
                   help="stage_training's batch (default 128, the protocol's; tiny: 8)")
    p.add_argument("--stage_epochs", type=int, default=100,
                   help="epochs of stage_training's whole-stage figures (the protocol's 100)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.image_size = args.image_size or (32 if args.tiny else 224)
    args.batches = args.batches or ([8] if args.tiny else [64, 128, 256, 512, 1024])
    args.epoch_images = args.epoch_images or (64 if args.tiny else 1000)
    args.repeats = args.repeats or (3 if args.tiny else 10)
    args.stage_batch = args.stage_batch or (8 if args.tiny else 128)
    result = run(args)
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)


def write_json(path: str, result: dict[str, Any]) -> None:
    """Writes `result` to `path` whole (a temporary file renamed over it)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
