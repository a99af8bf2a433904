"""The whole VTAB-1k protocol of one task, run one by one and as one program per stage, timed.

    python experiments/sweep_speed.py --json PATH [--setups demo,b16] [--epochs 20]
        [--b16_epochs 2] [--modes sequential,one,shared] [--workdir DIR]
    python experiments/sweep_speed.py --add_floor experiments/results/sweep_speed_demo.json
    python experiments/sweep_speed.py --setups gpu [--folder DIR] [--ts 1,10,20] [--tiny]
        [--gpu_epochs 100] [--dtype float32] [--one_by_one K] [--json PATH]

For each setup it runs `vqt_jax.sweep.run_sweep` (VQT, the release's 20-point (lr, wd) grid on
train -> val, the selected point retrained with 5 seeds on train+val -> test) twice or three times,
each in a process of its own and a fresh workdir whose caches it removes when done (each protocol
starts alone on the machine): first every run on its own (`program='sequential'`, how the protocol
ran before), then each stage's runs as one program (`program='one'`), then as one program with the
seeds sharing seed 0's example order (`order_seed=0`: each seed keeps its own init and dropout; its
program reads each cached batch once for all seeds). Each builds its own caches and compiles its own
programs, so each time is the whole protocol: cache builds, training, evaluation. It reports the
times and their ratios to the one-by-one time, whether the selection and the test top-1s are
identical (with a shared order the seeds are other runs: it reports how far their test top-1s and
mean move; `--modes` may leave that protocol out), and each time in *backbone-forward equivalents*:
the time over that of one inference pass (the model's forward, images already in memory) over all
the task's images (train + val + test), the floor any protocol that looks at every image must pay
(timed in a process of its own before and after the protocols; the faster counts);
and the *FLOP floor*: that pass plus the protocol's training arithmetic (XLA's count of a VQT step
from the cache, times every run's steps) at the FLOP rate the pass reached (`--add_floor JSON` adds
it to an earlier run's figures without timing them again). With it, the *matmul floor*: all that
arithmetic at the best rate this machine's XLA reaches on a bare float32 matmul (`matmul_gflop_s`,
timed in a process of its own), and the most any protocol could gain over the runs one by one
(`max_ratio`): nothing of a real program (elementwise work, attention, gathers, compilation,
input, writing) runs that fast, so it bounds every ratio from above. Each setup's figures
record the machine (`machine`: CPU model, ISA flags, cores, jax; `vqt_jax.timing.machine`), so
figures from different CPUs can be told apart.

Setups:
  * demo: configs/demo.py's task (Fashion-MNIST train800/val200/test1000 and DINOv2 ViT-S/14 at
    112 px; its feature-head baselines off) for `--epochs` epochs.
  * b16: ViT-B/16 at 224 px (random weights written as a big_vision .npz: time does not
    depend on the values) on a Fashion-MNIST folder of 1000 train, 200 val and 1000 test images,
    for `--b16_epochs` epochs.
  * gpu: b16's model and folder (`--folder DIR`, e.g. one carried to a GPU machine;
    default: written from Debian's Fashion-MNIST) at the release's per-task settings of T = 1
    (with its compression stage), 10 and 20 (`--ts`), `--dtype` compute (float32 default)
    and a bfloat16 cache, each stage as one program, each T in a process of its own, for
    `--gpu_epochs` epochs (the release's 100). It reports each T's whole protocol, its compile
    time apart, and the time of its test evaluation per image, and estimates the 19 tasks of
    VTAB-1k from them (`estimate_vtab`: each task at its release T, its evaluation scaled to
    its test split's size, `vqt_jax.data.tasks.TEST_SIZES`). `--one_by_one K` also times the
    first K grid runs one by one (each compiles alone). `experiments/gpu_carry.sh` writes the
    folder and the wheels a GPU machine with only jax, flax, optax, orbax, numpy and pillow lacks.

Persistent compilation caching is off for both runs (each pays its own compilations); the
machine should be otherwise idle. `--tiny` runs a 2-layer model on a small folder (a check that
the script works, no figures; with `--setups gpu`, that setup's protocol).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from vqt_jax import protocol
from vqt_jax import resolve as resolve_lib
from vqt_jax import sweep as sweep_lib
from vqt_jax.checkpoints import synthetic

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TASK = "folder"
SEEDS = 5
# name: (program, extra overrides)
MODES = {"sequential": ("sequential", {}), "one": ("one", {}),
         "shared": ("one", {"order_seed": 0})}


def demo_config(epochs: int, root: str) -> tuple[Callable[[str], ml_collections.ConfigDict],
                                                  dict]:
    """configs/demo.py, with its baselines off, `epochs` epochs and a tenth of them warm-up
    (`root` is unused: the demo's data and weights live in its own cache)."""
    del root
    return sweep_lib.load_config_fn(CONFIGS / "demo.py"), {
        "epochs": epochs, "warmup_epochs": epochs // 10, "baselines": ()}


def b16_config(epochs: int, root: str, data_dir: str | None = None
               ) -> tuple[Callable[[str], ml_collections.ConfigDict], dict]:
    """configs/vtab.py's folder task at ViT-B/16 224 px on a 1000/200/1000 Fashion-MNIST folder
    (`data_dir`, or one written under `root`), from random weights written once as a big_vision
    .npz under `root`."""
    from vqt_jax.data import fashion_mnist  # noqa: PLC0415

    data_dir = data_dir or os.path.join(root, "fashion_mnist_1000_200_1000")
    if not os.path.isdir(data_dir):
        fashion_mnist.write_vtab_style_subset(data_dir, num_train=1000, num_val=200,
                                              num_test=1000)
    init = synthetic.write_random_npz(os.path.join(root, "b16_random.npz"), 224, variant="B/16")
    return sweep_lib.load_config_fn(CONFIGS / "vtab.py"), {
        "epochs": epochs, "warmup_epochs": epochs // 10, "data_dir": data_dir, "init": init,
        "cache_dtype": "bfloat16",
        "normalization": "imagenet"}


TINY_MODEL = dict(variant=None, patch_size=(8, 8), width=32, depth=2, mlp_dim=64, num_heads=2)


def tiny_config(epochs: int, root: str) -> tuple[Callable[[str], ml_collections.ConfigDict],
                                                  dict]:
    """A 2-layer ViT at 16 px on a 27-image folder (`--tiny`)."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    data_dir = os.path.join(root, "tiny")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        for c in range(3):
            os.makedirs(os.path.join(data_dir, split, f"c{c}"), exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                img[..., c] = 240
                Image.fromarray(img).save(os.path.join(data_dir, split, f"c{c}", f"{i}.png"))
    init = synthetic.write_random_npz(os.path.join(root, "tiny.npz"), 16, **TINY_MODEL)
    vtab = sweep_lib.load_config_fn(CONFIGS / "vtab.py")

    def config_fn(task: str) -> ml_collections.ConfigDict:
        c = vtab(task)
        c.model.update(TINY_MODEL)
        return c

    return config_fn, {"epochs": epochs, "warmup_epochs": 1, "data_dir": data_dir,
                       "init": init, "image_size": 16, "batch_size": 8, "eval_batch_size": 8}


def gpu_config(epochs: int, root: str, *, num_queries: int = 1, folder: str | None = None,
               dtype: str = "float32", tiny: bool = False
               ) -> tuple[Callable[[str], ml_collections.ConfigDict], dict]:
    """The gpu setup: b16's model and folder with the release's settings of a task of T.

    Args:
      epochs: epochs of every run.
      root: where the weights (and, without `folder`, the folder) are written.
      num_queries: T; the compression stage runs where the release runs it (T = 1).
      folder: a 1000/200/1000 image folder (default: b16's, written under `root`).
      dtype: the compute dtype (`model.dtype`); the cache is bfloat16.
      tiny: `tiny_config`'s model and folder instead (any CPU, in seconds).

    Returns:
      (config_fn, overrides), as every setup.
    """
    config_fn, overrides = (tiny_config(epochs, root) if tiny else
                            b16_config(epochs, root, folder))
    return config_fn, {**overrides, "model.num_queries": num_queries,
                       "compression.enabled": num_queries == 1, "model.dtype": dtype,
                       "cache_dtype": "bfloat16"}


# name -> fn(epochs, root, **options) -> (config_fn, overrides): the setups `--setups` names.
SETUPS = {"demo": demo_config, "b16": b16_config, "tiny": tiny_config, "gpu": gpu_config}
# The gpu setup's T: those of the release's tasks (`vqt_jax.data.tasks.RELEASE_SETTINGS`).
GPU_TS = (1, 10, 20)
# The targets: the 19 tasks in under 40 minutes on one H100-class GPU, a T = 1 task in
# at most 120 s.
TARGETS = {"vtab_19_s": 2400, "t1_task_s": 120}


def forward_pass_seconds(config_fn, overrides: dict) -> tuple[float, int]:
    """(seconds of one inference pass over the task's train, val and test images, images):
    the model's forward over batches already normalised in memory (train and val as the
    cache's pass batches them, test as evaluation does), after a batch of each shape (they
    compile); the median of 2 passes, or one pass when it takes over a minute (ViT-B/16 at
    224 on a CPU: a pass is many minutes, and its noise is small)."""
    import jax  # noqa: PLC0415
    from jax.sharding import NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    from vqt_jax import cache as cache_lib  # noqa: PLC0415
    from vqt_jax import data, inference  # noqa: PLC0415
    from vqt_jax.training import batches as batches_lib  # noqa: PLC0415
    from vqt_jax.training import engine, train  # noqa: PLC0415

    config = resolve_lib.resolve(config_fn(TASK), overrides)
    plan = train.plan_run(config, None)
    config = plan.config
    variables, _ = train.init_variables(plan, 0)
    norm = data.as_normalization(config.normalization)
    batch = config.eval_batch_size or config.batch_size
    sharding = NamedSharding(plan.mesh, P("data"))
    # train + val as training loads them, test as evaluation does (the same preprocessing).
    train_val = data.load_train_examples(TASK, config.data_dir, "test", config.image_size,
                                         protocol.round_resized(config))[0]
    batches = [{"image": data.normalize_array(local["image"], norm)} for _, local in
               cache_lib.host_batches(len(train_val), batch, lambda sl: {
                   "image": train_val[sl]}, sharding=sharding,
                   last_multiple=plan.mesh.shape["data"])]
    batches += [{"image": b["image"]} for b in batches_lib.eval_batches(config, plan.mesh)]
    batches = [engine.global_batch(b, sharding)["image"] for b in batches]
    fn = inference.forward_fn(lambda v, x: plan.model.apply(v, x), plan.mesh)

    def run_pass() -> None:
        jax.block_until_ready([fn(variables, x) for x in batches])

    for x in {x.shape: x for x in batches}.values():  # compiles each batch shape
        jax.block_until_ready(fn(variables, x))
    times = []
    while len(times) < 2 and (not times or times[0] < 60):
        t = time.perf_counter()
        run_pass()
        times.append(time.perf_counter() - t)
    return statistics.median(times), len(train_val) + plan.num_eval


def flop_floor(config_fn, overrides: dict, forward_s: float, images: int) -> dict:
    """The protocol's FLOP floor on this machine: the seconds of one inference pass over all
    the task's images (`forward_s`, measured) plus the protocol's training arithmetic (every
    run's steps, XLA's count of one VQT step from the cache: `vqt_jax.costs`) at the FLOP rate
    that pass reached. What any protocol that looks at every image once and trains every run
    must pay, unless its training runs faster per FLOP than the backbone's forward."""
    from vqt_jax import cache as cache_lib  # noqa: PLC0415
    from vqt_jax import costs, data, methods  # noqa: PLC0415
    from vqt_jax.training import train  # noqa: PLC0415

    config = resolve_lib.resolve(config_fn(TASK), overrides)
    plan = train.plan_run(config, None)
    config, model = plan.config, plan.model
    variables = train.abstract_variables(model, config)
    spec = cache_lib.spec_for(model, cache_lib.kind_for(config.method), 1, config.image_size,
                              config.get("cache_dtype", "float32"))
    per_image = costs.forward_flops(model, variables, config.image_size)
    per_step = costs.cached_step_flops(model, variables, spec, config.batch_size,
                                       method=config.method,
                                       optimizer=methods.optimizer_name(config))
    grid = sweep_lib.grid_for(config.method)

    def steps(split: str) -> int:  # one run's steps on the split's training set
        return train.run_schedule(
            config, data.get_num_examples(TASK, config.data_dir, split, "train"), 1.0)[1]

    run_steps = len(grid.base_lrs) * len(grid.wds) * steps("val") + SEEDS * steps("test")
    rate = per_image * images / forward_s
    floor_s = forward_s + run_steps * per_step / rate
    return {"forward_gflops_per_image": round(per_image / 1e9, 3),
            "forward_gflop_s": round(rate / 1e9, 1),
            "run_step_gflops": round(per_step / 1e9, 3), "training_run_steps": run_steps,
            "training_tflops": round(run_steps * per_step / 1e12, 2),
            "flop_floor_s": floor_s, "flops": per_image * images + run_steps * per_step}


def with_floor(row: dict, config_fn, overrides: dict, forward_s: float | None = None) -> dict:
    """`row` (a setup's figures) with its FLOP floor (`flop_floor`, from its own forward pass:
    `forward_s`, or the one it recorded) and each protocol's time over it; and, where the row
    has `matmul_gflop_s`, its matmul floor and `max_ratio` (the module's docstring)."""
    row = {**row, **flop_floor(config_fn, overrides, forward_s or row["forward_pass_s"],
                               row["images"])}
    for mode in MODES:  # over the unrounded floor (--tiny's is well under 0.1 s)
        if f"{mode}_s" in row:
            row[f"{mode}_over_floor"] = round(row[f"{mode}_s"] / row["flop_floor_s"], 2)
    row["flop_floor_s"] = round(row["flop_floor_s"], 1)
    flops = row.pop("flops")  # the pass's and the training's, unrounded
    if row.get("matmul_gflop_s"):
        matmul_floor = flops / (row["matmul_gflop_s"] * 1e9)
        row["matmul_floor_s"] = round(matmul_floor, 1)
        row["max_ratio"] = round(row["sequential_s"] / matmul_floor, 2)
    return row


def matmul_gflop_s(width: int, mlp_dim: int, rows: int, repeats: int = 10,
                   square: int = 4096) -> float:
    """The best float32 matmul rate XLA reaches on this machine, in GFLOP/s: the fastest of
    the query path's two MLP matmuls at `rows` rows ([rows, width] x [width, mlp_dim] and
    [rows, mlp_dim] x [mlp_dim, width]: a grid step's, every member's batch together) and a
    `square`^3 one, each the median of `repeats` runs after one that compiles."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from vqt_jax.timing import median_seconds  # noqa: PLC0415

    rates = []
    for m, k, n in ((rows, width, mlp_dim), (rows, mlp_dim, width), (square,) * 3):
        x, w = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
        seconds = median_seconds(functools.partial(jax.jit(jnp.matmul), x, w), repeats)
        rates.append(2 * m * k * n / seconds / 1e9)
    return max(rates)


def timed_matmuls(name: str, epochs: int, root: str) -> float:
    """`matmul_gflop_s` at setup `name`'s width and MLP, at the rows of its grid's step."""
    from vqt_jax.training import train  # noqa: PLC0415

    config_fn, overrides = _setup(name, epochs, root)
    plan = train.plan_run(resolve_lib.resolve(config_fn(TASK), overrides), None)
    grid = sweep_lib.grid_for(plan.config.method)
    members = len(grid.base_lrs) * len(grid.wds)
    model = plan.model
    return round(matmul_gflop_s(model.width, model.mlp_dim or 4 * model.width,
                                members * plan.config.batch_size), 1)


def measure(name: str, epochs: int, workdir: str,
            modes: tuple[str, ...] = tuple(MODES)) -> dict:
    """The protocols `modes` (sequential and one at least) of setup `name`, timed, compared,
    and the forward pass: each in a process of its own (`_in_fresh_process`)."""
    config_fn, overrides = _setup(name, epochs, workdir)
    out: dict = {"setup": name, "epochs": epochs, "seeds": SEEDS}
    # The pass both protocols are measured against, timed before and after them: a shared
    # machine's speed drifts over hours (docs/performance.md), and the floor is a lower bound,
    # so the faster of the two counts.
    first, images = _in_fresh_process(timed_forward, name, epochs, workdir)
    results = {}
    for mode in modes:
        out[f"{mode}_s"], results[mode], out[f"{mode}_profile"] = _in_fresh_process(
            timed_sweep, name, epochs, workdir, mode)
    last, _ = _in_fresh_process(timed_forward, name, epochs, workdir)
    forward_s = min(first, last)
    out["matmul_gflop_s"] = _in_fresh_process(timed_matmuls, name, epochs, workdir)
    seq, one = results["sequential"], results["one"]
    grid = sweep_lib.grid_for("vqt")
    out.update(
        runs=len(grid.base_lrs) * len(grid.wds) + SEEDS,
        ratio=round(out["sequential_s"] / out["one_s"], 2),
        selected={"lr": one.lr, "wd": one.wd, "val_top1": one.val_top1},
        test_top1=list(one.test_top1),
        identical_selection=_selection(seq) == _selection(one),
        identical_test_top1=seq.test_top1 == one.test_top1,
        sequential_test_top1=list(seq.test_top1))
    if shared := results.get("shared"):
        out.update(
            shared_ratio=round(out["sequential_s"] / out["shared_s"], 2),
            shared_identical_selection=_selection(seq) == _selection(shared),
            shared_test_top1=list(shared.test_top1),
            shared_mean_change=round(statistics.mean(shared.test_top1)
                                     - statistics.mean(seq.test_top1), 5),
            shared_max_change=round(max(abs(a - b) for a, b in zip(
                shared.test_top1, seq.test_top1, strict=True)), 5))
    out.update(forward_pass_s=round(forward_s, 2),
               forward_pass_before_after_s=[round(first, 2), round(last, 2)], images=images, **{
        f"{mode}_forward_equivalents": round(out[f"{mode}_s"] / forward_s, 1) for mode in modes})
    return with_floor(out, config_fn, overrides, forward_s)


def _setup(name: str, epochs: int, root: str, options: dict | None = None
           ) -> tuple[Callable, dict]:
    """`SETUPS[name]` (given `options`) with persistent compilation caching off (each protocol
    pays its own compilations). Each process calls it (a spawned one cannot be sent the config
    function); its files are written once."""
    config_fn, overrides = SETUPS[name](epochs, root, **(options or {}))
    return config_fn, {**overrides, "compilation_cache_dir": ""}


def timed_forward(name: str, epochs: int, root: str) -> tuple[float, int]:
    """`forward_pass_seconds` of setup `name`."""
    return forward_pass_seconds(*_setup(name, epochs, root))


# Where a protocol's time goes: its phases by the first words of their progress lines.
PHASES = (("Caching", "cache_build"), ("Training", "training"), ("Compression", "compression"),
          ("Evaluat", "evaluation"))
# JAX's events for tracing, lowering and compiling a program.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def _profiling() -> dict[str, float]:
    """Starts collecting this process's profile: seconds per phase (`PHASES`: the phases'
    progress spans, `vqt_jax.progress.Progress`), `compile` (JAX's compile events; a program
    compiled inside a phase's span counts in both), and the evaluations on test: their images
    (`test_images`) and seconds less the compilations inside them (`test_evaluation`)."""
    import jax  # noqa: PLC0415

    from vqt_jax import progress  # noqa: PLC0415

    profile = dict.fromkeys([name for _, name in PHASES] + ["compile", "test_evaluation",
                                                           "test_images"], 0.0)
    compiles: list[tuple[float, float]] = []  # (when it ended, seconds), on Progress's clock

    def on_event(event: str, seconds: float, **_) -> None:
        if event in COMPILE_EVENTS:
            profile["compile"] += seconds
            compiles.append((time.monotonic(), seconds))

    jax.monitoring.register_event_duration_secs_listener(on_event)
    done = progress.Progress.done

    def timed_done(self) -> float:
        seconds = done(self)
        for prefix, name in PHASES:
            if self.what.startswith(prefix):
                profile[name] += seconds
        if self.what.startswith("Evaluat") and self.what.endswith(" on test"):
            profile["test_images"] += self.count
            profile["test_evaluation"] += seconds - sum(s for t, s in compiles
                                                        if t >= self.start)
        return seconds

    progress.Progress.done = timed_done
    return profile


def timed_sweep(name: str, epochs: int, root: str, mode: str, options: dict | None = None
                ) -> tuple[float, sweep_lib.TaskResult, dict[str, float]]:
    """(seconds, result) of the protocol `mode` on setup `name` (given `options`), in
    `root/name/mode`, and its profile (`_profiling`; `other`: the rest of the time); its caches
    are removed afterwards (their pages would crowd the next protocol's out of the host's
    memory)."""
    config_fn, overrides = _setup(name, epochs, root, options)
    program, extra = MODES[mode]
    directory = os.path.join(root, name, mode)
    # Its own cache directory: the default ($VQT_JAX_CACHE/features) is shared by contents,
    # so the next protocol would reuse this one's cache instead of paying its own build.
    cache_dir = os.path.join(directory, TASK, "cache")
    profile = _profiling()
    start = time.perf_counter()
    result = sweep_lib.run_sweep(
        [TASK], directory, base_config_fn=config_fn, method="vqt", num_seeds=SEEDS,
        overrides={**overrides, **extra, "cache_dir": cache_dir},
        task_groups={TASK: sweep_lib.FOLDER_GROUP}, program=program)[0]
    seconds = round(time.perf_counter() - start, 1)
    shutil.rmtree(cache_dir, ignore_errors=True)
    profile["other"] = seconds - sum(profile[name] for _, name in PHASES)
    return seconds, result, {k: v if k.startswith("test_") else round(v, 1)
                             for k, v in profile.items()}


def timed_task(epochs: int, root: str, options: dict) -> dict:
    """The gpu setup's protocol at `options` (`gpu_config`'s), each stage as one program, in
    a fresh workdir: its seconds, compile seconds apart, profile, test evaluation per image,
    results, and the device and JAX it ran on."""
    import jax  # noqa: PLC0415

    from vqt_jax import cli  # noqa: PLC0415

    cli.setup_logging()  # the phases' progress lines, in the log that comes back
    seconds, result, profile = timed_sweep("gpu", epochs, root, "one", options)
    shutil.rmtree(os.path.join(root, "gpu"), ignore_errors=True)
    test_images = profile.pop("test_images")
    per_image = profile.pop("test_evaluation") / max(test_images, 1)
    return {"T": options["num_queries"], "compression": options["num_queries"] == 1,
            "seconds": seconds, "compile_s": profile["compile"],
            "seconds_less_compile": round(seconds - profile["compile"], 1),
            "profile": profile, "test_images": int(test_images),
            "test_evaluation_ms_per_image": round(1e3 * per_image, 4),
            "selected": {"lr": result.lr, "wd": result.wd, "val_top1": result.val_top1},
            "test_top1": list(result.test_top1),
            "device": jax.devices()[0].device_kind, "jax": jax.__version__}


class _Enough(Exception):
    """Raised by `timed_one_by_one`'s trainer once it has timed the runs asked for."""


def timed_one_by_one(epochs: int, root: str, options: dict, runs: int) -> list[float]:
    """Seconds of each of the protocol's first `runs` runs (grid points), each trained and
    evaluated on its own as the one by one protocol runs it (its own compilations; the first
    also builds the cache)."""
    from vqt_jax import cli  # noqa: PLC0415
    from vqt_jax.training import train  # noqa: PLC0415

    cli.setup_logging()
    config_fn, overrides = _setup("gpu", epochs, root, options)
    directory = os.path.join(root, "gpu_one_by_one")
    shutil.rmtree(directory, ignore_errors=True)
    times: list[float] = []

    def train_fn(config, workdir):
        if len(times) == runs:
            raise _Enough
        start = time.perf_counter()
        out = train.train_and_evaluate(config, workdir)
        times.append(round(time.perf_counter() - start, 1))
        return out

    try:
        sweep_lib.run_sweep([TASK], directory, base_config_fn=config_fn, method="vqt",
                            num_seeds=SEEDS, train_fn=train_fn, program="sequential",
                            overrides={**overrides,
                                       "cache_dir": os.path.join(directory, "cache")},
                            task_groups={TASK: sweep_lib.FOLDER_GROUP})
    except _Enough:
        pass
    shutil.rmtree(directory, ignore_errors=True)
    return times


def estimate_vtab(tasks: list[dict]) -> dict:
    """The 19 tasks of VTAB-1k, each at its release T (`RELEASE_SETTINGS`), from measured ones.

    Each task's time is its T's protocol, with the test evaluation scaled from the measured
    test images to the task's size (`vqt_jax.data.tasks.TEST_SIZES`) at the measured time per
    image. The measured folder trains on 1000 images and the tasks on 800: the training part
    is an upper bound.

    Args:
      tasks: `timed_task`'s figures, one per T.

    Returns:
      {'per_task_s', 'targets'} and, where every T was measured, 'total_s', 'total_min',
      'slowest_t1_task_s' and 'meets' (each target: whether the estimate meets it); else
      'not_measured_T'.
    """
    from vqt_jax.data import tasks as tasks_lib  # noqa: PLC0415

    by_t = {row["T"]: row for row in tasks}
    per_task, missing = {}, set()
    for name, setting in tasks_lib.RELEASE_SETTINGS.items():
        row = by_t.get(setting.num_queries)
        if row is None:
            missing.add(setting.num_queries)
            continue
        extra = ((tasks_lib.TEST_SIZES[name] - row["test_images"])
                 * row["test_evaluation_ms_per_image"])
        per_task[name] = round(row["seconds"] + extra / 1e3, 1)
    out: dict = {"per_task_s": per_task, "targets": TARGETS}
    if missing:
        out["not_measured_T"] = sorted(missing)
        return out
    total = sum(per_task.values())
    t1 = max(s for n, s in per_task.items() if tasks_lib.RELEASE_SETTINGS[n].num_queries == 1)
    out.update(total_s=round(total, 1), total_min=round(total / 60, 1),
               slowest_t1_task_s=t1, meets={"vtab_19": total < TARGETS["vtab_19_s"],
                                            "t1_task": t1 <= TARGETS["t1_task_s"]})
    return out


def measure_gpu(epochs: int, workdir: str, ts: tuple[int, ...], options: dict,
                one_by_one: int = 0, write: Callable[[dict], None] | None = None) -> dict:
    """The gpu setup's figures, each part timed in a process of its own.

    Args:
      epochs: epochs of every run.
      workdir: where the runs, weights and folder go.
      ts: the T to time (`timed_task` for each).
      options: `gpu_config`'s options but T.
      one_by_one: if positive, that many runs one by one at the first T (`timed_one_by_one`).
      write: called with the figures so far after each part (a run cut short keeps what it
        measured).

    Returns:
      {'tasks': one `timed_task` row per T, 'estimate': `estimate_vtab`'s, 'one_by_one'
      where asked, the options and the machine}.
    """
    from vqt_jax import timing  # noqa: PLC0415

    out: dict = {"setup": "gpu", "epochs": epochs, "seeds": SEEDS, **options,
                 "machine": timing.machine(), "tasks": []}
    for t in ts:
        out["tasks"].append(_in_fresh_process(timed_task, epochs, workdir,
                                              {**options, "num_queries": t}))
        out["estimate"] = estimate_vtab(out["tasks"])
        if write:
            write(out)
    if one_by_one:
        times = _in_fresh_process(timed_one_by_one, epochs, workdir,
                                  {**options, "num_queries": ts[0]}, one_by_one)
        grid = sweep_lib.grid_for("vqt")
        runs = len(grid.base_lrs) * len(grid.wds) + SEEDS
        later = times[1:] or times
        out["one_by_one"] = {"T": ts[0], "run_s": times, "runs": runs,
                             # The first run builds the cache; the others at their mean.
                             "protocol_estimate_s": round(times[0] + (runs - 1) * sum(later)
                                                          / len(later), 1)}
        if write:
            write(out)
    return out


def report_gpu(out: dict) -> str:
    """The gpu setup's figures as a table, and its estimate of the 19 tasks."""
    lines = ["| T | compression | whole protocol | of it compiling | test evaluation per image "
             "| selected lr / wd | device |", "|---|---|---|---|---|---|---|"]
    for r in out["tasks"]:
        lines.append(f"| {r['T']} | {r['compression']} | {r['seconds']:.1f} s | "
                     f"{r['compile_s']:.1f} s | {r['test_evaluation_ms_per_image']:.3f} ms | "
                     f"{r['selected']['lr']} / {r['selected']['wd']} | {r['device']} |")
    est = out.get("estimate", {})
    if "total_s" in est:
        lines.append(f"\nVTAB-1k's 19 tasks at their release T: {est['total_min']:.1f} min "
                     f"(target < {TARGETS['vtab_19_s'] // 60} min: {est['meets']['vtab_19']}); "
                     f"slowest T=1 task {est['slowest_t1_task_s']:.0f} s (target <= "
                     f"{TARGETS['t1_task_s']} s: {est['meets']['t1_task']})")
    if "one_by_one" in out:
        o = out["one_by_one"]
        lines.append(f"One by one (T={o['T']}): runs {o['run_s']} s; the {o['runs']} runs "
                     f"about {o['protocol_estimate_s']:.0f} s")
    return "\n".join(lines)


def _in_fresh_process(fn: Callable, *args: Any) -> Any:
    """`fn(*args)` in a new Python process (spawned: nothing of this one's JAX state, memory
    or compiled programs carries over), so that each protocol is timed alone, not after
    another in the same process (ViT-B/16: the one program took 910 s after the sequential
    protocol in one process, 793 s alone)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def _selection(result: sweep_lib.TaskResult) -> tuple:
    return result.lr, result.wd, result.val_top1


def report(rows: list[dict]) -> str:
    lines = ["| setup | epochs | one by one | one program (ratio) | identical selection / "
             "test | one program, shared order (ratio) | its test mean / largest change | "
             "forward pass (all images) | in forwards: one by one / one / shared | "
             "FLOP floor (training) | one program / floor | matmul floor (most any protocol "
             "could gain) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shared = ("not run", "not run", "-")
        if "shared_s" in r:
            shared = (f"{r['shared_s']:.0f} s ({r['shared_ratio']:.1f}x)",
                      f"{100 * r['shared_mean_change']:+.2f} / "
                      f"{100 * r['shared_max_change']:.2f} points",
                      f"{r['shared_forward_equivalents']:.1f}")
        lines.append(
            f"| {r['setup']} | {r['epochs']} | {r['sequential_s']:.0f} s | "
            f"{r['one_s']:.0f} s ({r['ratio']:.1f}x) | "
            f"{r['identical_selection']} / {r['identical_test_top1']} | "
            f"{shared[0]} | {shared[1]} | "
            f"{r['forward_pass_s']:.1f} s ({r['images']} images) | "
            f"{r['sequential_forward_equivalents']:.0f} / {r['one_forward_equivalents']:.1f} / "
            f"{shared[2]} | {r['flop_floor_s']:.0f} s ({r['training_tflops']:.1f} TFLOP) | "
            f"{r['one_over_floor']:.2f}x | " + (
                f"{r['matmul_floor_s']:.0f} s at {r['matmul_gflop_s']:.0f} GFLOP/s "
                f"({r['max_ratio']:.1f}x) |" if "max_ratio" in r else "not timed |"))
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line (README's `python experiments/sweep_speed.py --json PATH`)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", default="demo,b16", help="comma-separated: demo, b16, gpu")
    p.add_argument("--epochs", type=int, default=20, help="epochs of the demo setup")
    p.add_argument("--b16_epochs", type=int, default=2, help="epochs of the b16 setup")
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated protocols: sequential and one, optionally shared")
    p.add_argument("--gpu_epochs", type=int, default=100, help="epochs of the gpu setup")
    p.add_argument("--ts", default=",".join(map(str, GPU_TS)),
                   help="comma-separated T (query tokens) of the gpu setup")
    p.add_argument("--folder", help="the gpu setup's 1000/200/1000 image folder (default: "
                   "written from Debian's Fashion-MNIST)")
    # float32 (TF32 matmuls on GPU), the release's: bfloat16 training cannot be checked on a
    # CPU, whose XLA has no bfloat16 x bfloat16 -> float32 dot for the stacked step.
    p.add_argument("--dtype", default="float32", help="the gpu setup's compute dtype "
                   "(model.dtype: float32 or bfloat16)")
    p.add_argument("--one_by_one", type=int, default=0, metavar="K",
                   help="the gpu setup also times its first K runs one by one")
    p.add_argument("--workdir", help="where the sweeps run (default: a temporary directory)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and folder (no figures)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--add_floor", metavar="JSON",
                   help="only add the FLOP floor (`flop_floor`) to the setups of an earlier "
                   "run's JSON, from the forward pass it measured (nothing of the protocols "
                   "is timed; the matmul rate is, where the JSON lacks it)")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    from vqt_jax import cli, timing  # noqa: PLC0415

    cli.setup_logging()  # main.py's log format, libraries quiet
    with tempfile.TemporaryDirectory(prefix="sweep_speed_") as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        if args.add_floor:
            return add_floor(args.add_floor, workdir)
        names = [s.strip() for s in args.setups.split(",")]
        unknown = [n for n in names if n not in SETUPS]
        if unknown:
            raise SystemExit(f"error: unknown setup(s) {unknown}; choose from demo, b16, gpu")
        if "gpu" in names:  # --tiny: its protocol on the tiny model and folder
            if len(names) > 1:
                raise SystemExit("error: --setups gpu runs alone (its JSON has another form)")
            return [run_gpu(args, workdir)]
        epochs = {"demo": args.epochs, "b16": args.b16_epochs, "tiny": 2}
        names = ["tiny"] if args.tiny else names
        modes = tuple(m.strip() for m in args.modes.split(","))
        if not {"sequential", "one"} <= set(modes) or not set(modes) <= set(MODES):
            raise SystemExit(f"error: --modes={args.modes!r}: sequential and one, optionally "
                             "shared")
        rows = []
        for name in names:
            rows.append({**measure(name, epochs[name], workdir, modes),
                         "machine": timing.machine()})
            print(report(rows), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=2)
    return rows


def run_gpu(args: argparse.Namespace, workdir: str) -> dict:
    """`--setups gpu`: `measure_gpu` with the command line's options, its JSON rewritten after
    each T."""

    def write(out: dict) -> None:
        print(report_gpu(out), flush=True)
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(out, f, indent=2)
            os.replace(args.json + ".tmp", args.json)

    folder = os.path.abspath(args.folder) if args.folder else None
    options = {"folder": folder, "dtype": args.dtype, "tiny": args.tiny}
    ts = tuple(int(t) for t in args.ts.split(","))
    return measure_gpu(2 if args.tiny else args.gpu_epochs, workdir, ts, options,
                       args.one_by_one, write)


def add_floor(path: str, workdir: str) -> list[dict]:
    """`--add_floor`: the JSON at `path` with each setup's FLOP floor added (rewritten whole),
    and its matmul rate timed (in a process of its own) where the JSON lacks it."""
    with open(path) as f:
        rows = json.load(f)
    for r in rows:
        if "matmul_gflop_s" not in r:
            r["matmul_gflop_s"] = _in_fresh_process(timed_matmuls, r["setup"], r["epochs"],
                                                    workdir)
    rows = [with_floor(r, *SETUPS[r["setup"]](r["epochs"], workdir)) for r in rows]
    print(report(rows), flush=True)
    with open(path + ".tmp", "w") as f:
        json.dump(rows, f, indent=2)
    os.replace(path + ".tmp", path)
    return rows


if __name__ == "__main__":
    main()
