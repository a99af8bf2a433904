"""Training memory and step time of VQT against the inference forward and full fine-tuning.

    python experiments/memory.py [--batch 64] [--reps 3] [--json PATH]

For ViT-B/16 at 224 (random weights: memory and time do not depend on the values) it compiles,
in one run on this machine:
  * forward:      the inference forward pass of the VQT model (T=1), no gradient;
  * vqt:          a VQT train step (T=1): queries + head trained with Adam;
  * vqt_bf16_kv:  the same with the keys/values the query path keeps stored in bfloat16;
  * full:         a full fine-tuning train step (every parameter trained with Adam);
and reports XLA's compiled memory (`jit(...).lower(...).compile().memory_analysis()`:
temp + argument + output bytes, minus output bytes aliased to donated arguments) and the median
wall time of `--reps` steps after one warm-up. It prints the physical floor of the VQT backward,
the key/value stash B*M*N*D*2 numbers, beside the figures, and the ratios VQT/forward and
VQT/full. With `--json PATH` the same figures are written as one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqt_jax import train_step
from vqt_jax import trainable as trainable_lib
from vqt_jax.models import create_model

MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of the table: a model configuration and what is trained (None: inference)."""

    model_kwargs: dict
    method: str | None


SETTINGS: dict[str, Setting] = {
    "forward": Setting(dict(num_queries=1), None),
    "vqt": Setting(dict(num_queries=1), "vqt"),
    "vqt_bf16_kv": Setting(dict(num_queries=1, kv_dtype=jnp.bfloat16), "vqt"),
    "full": Setting(dict(num_queries=0), "full"),
}


def _compiled_fn(setting: Setting, variant: str, batch: int, image_size: int, num_classes: int):
    """Returns (compiled function, its arguments) for one setting."""
    model = create_model(variant, num_classes=num_classes, **setting.model_kwargs)
    shape = (batch, image_size, image_size, 3)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, shape), jnp.float32)
    labels = jnp.asarray(np.arange(batch) % num_classes, jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), images[:1])
    if setting.method is None:
        fn = jax.jit(lambda v, x: model.apply(v, x))
        args = (variables, images)
    else:
        trainable, frozen = trainable_lib.partition(
            variables, trainable_lib.rule_for(setting.method)
        )
        tx = optax.adamw(1e-3, weight_decay=1e-4)
        opt_state = tx.init(trainable)
        fn = jax.jit(train_step.make_train_step(model, tx), donate_argnums=(0, 1))
        args = (trainable, opt_state, frozen, {"image": images, "label": labels},
                jax.random.key(1))
    return fn.lower(*args).compile(), args


def memory_bytes(compiled) -> dict[str, int]:
    """XLA's memory analysis of a compiled function, with the total it implies."""
    m = compiled.memory_analysis()
    out = dict(
        temp=int(m.temp_size_in_bytes),
        argument=int(m.argument_size_in_bytes),
        output=int(m.output_size_in_bytes),
        alias=int(m.alias_size_in_bytes),
    )
    out["total"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    return out


def median_step_seconds(compiled, args: tuple, reps: int, is_train: bool) -> float:
    """Median wall time of `reps` calls after one warm-up; a train step is fed its own outputs."""
    args = list(args)

    def call():
        out = compiled(*args)
        jax.block_until_ready(out)
        if is_train:  # donated buffers: continue from the step's outputs
            args[0], args[1] = out[0], out[1]

    call()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def stash_bytes(variant: str, batch: int, image_size: int, bytes_per_number: int) -> int:
    """The physical floor of the VQT backward: every layer's keys and values, B*M*N*D*2."""
    model = create_model(variant)
    n = (image_size // model.patch_size[0]) * (image_size // model.patch_size[1]) + 1
    return batch * model.depth * n * model.width * 2 * bytes_per_number


def run(variant: str, batch: int, image_size: int, reps: int, settings: list[str],
        log: Callable[[str], None] = print) -> dict:
    """Measures every setting; returns the JSON-able results."""
    results: dict = dict(
        variant=variant, batch=batch, image_size=image_size, reps=reps,
        device=jax.devices()[0].device_kind, jax_version=jax.__version__,
        stash_mib=stash_bytes(variant, batch, image_size, 4) / MiB,
        stash_bf16_mib=stash_bytes(variant, batch, image_size, 2) / MiB,
        settings={},
    )
    for name in settings:
        setting = SETTINGS[name]
        compiled, args = _compiled_fn(setting, variant, batch, image_size, num_classes=10)
        mem = memory_bytes(compiled)
        is_train = setting.method is not None
        secs = median_step_seconds(compiled, args, reps, is_train) if reps else None
        results["settings"][name] = dict(
            memory_mib={k: v / MiB for k, v in mem.items()}, step_seconds=secs
        )
        t = f"{secs:8.2f} s" if secs is not None else "       -"
        log(f"{name:12s} memory {mem['total'] / MiB:9.1f} MiB (temp {mem['temp'] / MiB:8.1f}, "
            f"args {mem['argument'] / MiB:7.1f}, out {mem['output'] / MiB:7.1f}, "
            f"aliased {mem['alias'] / MiB:7.1f})  step {t}")
        del compiled, args
    s = results["settings"]
    ratios = {}
    for num, den in [("vqt", "forward"), ("vqt", "full"), ("vqt_bf16_kv", "forward"),
                     ("vqt_bf16_kv", "full")]:
        if num in s and den in s:
            r = {"memory": s[num]["memory_mib"]["total"] / s[den]["memory_mib"]["total"]}
            if s[num]["step_seconds"] and s[den]["step_seconds"]:
                r["time"] = s[num]["step_seconds"] / s[den]["step_seconds"]
            ratios[f"{num}/{den}"] = r
    results["ratios"] = ratios
    if "forward" in s and "vqt" in s:
        floor = s["forward"]["memory_mib"]["total"] + results["stash_mib"]
        results["vqt_over_forward_plus_stash"] = s["vqt"]["memory_mib"]["total"] / floor
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=3, help="timed steps per setting; 0: no timing")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args()
    names = [n for n in args.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    print(f"ViT-{args.variant} at {args.image_size}px, batch {args.batch}, on "
          f"{jax.devices()[0].device_kind} ({jax.device_count()} device(s))")
    res = run(args.variant, args.batch, args.image_size, args.reps, names)
    print(f"K/V stash (B*M*N*D*2): {res['stash_mib']:.1f} MiB float32, "
          f"{res['stash_bf16_mib']:.1f} MiB bfloat16")
    if "vqt_over_forward_plus_stash" in res:
        print(f"vqt / (forward + stash): {res['vqt_over_forward_plus_stash']:.3f}")
    for k, r in res["ratios"].items():
        t = f", time {r['time']:.2f}x" if "time" in r else ""
        print(f"{k:22s} memory {r['memory']:.3f}x{t}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
