"""Training memory and step time of every method against VQT and the inference forward.

    python experiments/memory.py [--variant B/16] [--batch 64] [--image_size 224] [--reps 3]
        [--settings forward,vqt,...] [--model KEY=VALUE ...] [--json PATH]

For ViT-B/16 at 224 (random weights: memory and time do not depend on the values) it compiles,
in one run on this machine, one setting per row:
  * forward:      the inference forward pass of the VQT model (T=1), no gradient;
  * every method of `vqt_jax.methods.METHODS` (vqt, linear, full, vpt_shallow, vpt_deep,
    adaptformer, lora, head2toe, vqt+vpt_deep, vqt+adaptformer, vqt+lora): one train step
    of the method, its model built by `methods.model_kwargs` from configs/vtab.py's model
    fields (T=1 query, 10 prompts, adapter bottleneck 64, LoRA rank 8), only its trainable
    set differentiated, with its release optimiser (Adam, SGD with momentum or AdamW; the
    optimiser state is part of the memory);
  * vqt_bf16_kv:  VQT with the keys/values its query path keeps stored in bfloat16;
Memory is compiled from abstract shapes (it does not depend on the values); only the timing
initialises the variables.
and reports XLA's compiled memory (`jit(...).lower(...).compile().memory_analysis()`:
temp + argument + output bytes, minus output bytes aliased to donated arguments) and the median
wall time of `--reps` steps after one warm-up. It prints a markdown table with each setting's
memory and time as multiples of VQT's and of the forward's, the physical floor of the VQT
backward (the key/value stash, B*M*N*D*2 numbers), and the targets:
  * VQT's memory at most 20% of VPT-deep's (prompt length 10) and of full fine-tuning's;
  * VQT's memory at most forward + stash + 10%;
  * VQT's step time at most 1.3x the forward's.
With `--json PATH` the same figures are written as one JSON object. `--model KEY=VALUE` sets
a model field for every setting (e.g. `--model num_prompts=50 num_queries=10`).

Smoke test on a tiny model (seconds, not a measurement):
    python experiments/memory.py --variant Ti/16 --image_size 32 --batch 2 --reps 1
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqt_jax import methods, resolve
from vqt_jax import trainable as trainable_lib
from vqt_jax.models import ViT, create_model
from vqt_jax.timing import median_seconds
from vqt_jax.training import optim, train_step

MiB = 2**20
NUM_CLASSES = 10
CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / "vtab.py"

# (numerator, denominator, at most): the memory targets, as ratios of total compiled memory.
MEMORY_TARGETS = (("vqt", "vpt_deep", 0.2), ("vqt", "full", 0.2))
TIME_TARGET = ("vqt", "forward", 1.3)
STASH_SLACK = 0.1  # VQT may use at most forward + stash + 10%


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of the table.

    Attributes:
      method: the model's method (its parts and trainable set, see `vqt_jax.methods`).
      train: a train step of the method; False: the inference forward of its model.
      model: model fields set on top of the config's (e.g. kv_dtype).
    """

    method: str
    train: bool = True
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)


SETTINGS: dict[str, Setting] = {
    "forward": Setting("vqt", train=False),
    "vqt": Setting("vqt"),
    "vqt_bf16_kv": Setting("vqt", model={"kv_dtype": "bfloat16"}),
    **{name: Setting(name) for name in methods.METHODS if name != "vqt"},
}


def config_model_fields(path: Path = CONFIG_PATH) -> dict[str, Any]:
    """configs/vtab.py's `model` fields (loaded by path: experiments/ is run as a script)."""
    spec = importlib.util.spec_from_file_location("_memory_vtab_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # The options a backbone file would tell ('auto') at their defaults: there is no file.
    return resolve.resolve(module.get_config(), {"init": ""}).model.to_dict()


def model_fields(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """configs/vtab.py's model fields with `overrides` set on top.

    Args:
      overrides: any ViT field but the variant's name and the head, which the script sets.

    Raises:
      ValueError: for a field the ViT does not have.
    """
    fields = config_model_fields()
    known = (set(fields) | {f.name for f in dataclasses.fields(ViT)}) - {
        "variant", "num_classes", "parent", "name"}
    if unknown := sorted(set(overrides) - known):
        raise ValueError(f"unknown model fields {unknown}; known: {', '.join(sorted(known))}")
    return {**fields, **overrides}


def build_model(setting: Setting, variant: str, fields: Mapping[str, Any]):
    """The setting's ViT: model `fields` (see `model_fields`) adjusted for its method."""
    fields = {**fields, **setting.model, "variant": variant}
    kwargs = methods.model_kwargs(setting.method, fields)
    variant = kwargs.pop("variant")
    if isinstance(kwargs.get("kv_dtype"), str):
        kwargs["kv_dtype"] = jnp.dtype(kwargs["kv_dtype"])
    return create_model(variant, num_classes=NUM_CLASSES, **kwargs)


def _step(setting: Setting, model, variables):
    """(function to measure, its arguments but the batch, trainable count) for `variables`.

    Works on concrete or abstract (`jax.ShapeDtypeStruct`) variables alike.
    """
    if not setting.train:
        return jax.jit(lambda v, x: model.apply(v, x)), (variables,), 0
    trainable, frozen = trainable_lib.partition(
        variables, trainable_lib.rule_for(setting.method))
    # The method's release optimiser: its state (none, one or two buffers per trained number)
    # is part of what a step holds.
    tx = optim.make_optimizer(optax.constant_schedule(1e-3), 1e-4, trainable,
                              methods.get(setting.method).optimizer)
    if isinstance(next(iter(trainable.values())), jax.ShapeDtypeStruct):
        opt_state = jax.eval_shape(tx.init, trainable)
    else:
        opt_state = tx.init(trainable)
    fn = jax.jit(train_step.make_train_step(train_step.make_loss_fn(model), tx),
                 donate_argnums=(0, 1))
    num_trainable = int(sum(np.prod(v.shape) for v in trainable.values()))
    return fn, (trainable, opt_state, frozen), num_trainable


def _batch(setting: Setting, batch: int, image_size: int) -> tuple:
    shape = (batch, image_size, image_size, 3)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, shape), jnp.float32)
    if not setting.train:
        return (images,)
    labels = jnp.asarray(np.arange(batch) % NUM_CLASSES, jnp.int32)
    return ({"image": images, "label": labels}, jax.random.key(1))


def compile_setting(setting: Setting, model, batch: int, image_size: int):
    """Compiles one setting from abstract variables: memory does not depend on the values.

    Returns:
      (compiled function, number of trainable numbers).
    """
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    fn, args, num_trainable = _step(setting, model, variables)
    return fn.lower(*args, *_batch(setting, batch, image_size)).compile(), num_trainable


def concrete_args(setting: Setting, model, batch: int, image_size: int) -> tuple:
    """Initialised arguments for `compile_setting`'s function, to time it."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), images)
    _, args, _ = _step(setting, model, variables)
    return (*args, *_batch(setting, batch, image_size))


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

    return median_seconds(call, reps)


def stash_bytes(model, image_size: int, bytes_per_number: int) -> int:
    """The physical floor of the VQT backward per example: every layer's keys and values."""
    n = (image_size // model.patch_size[0]) * (image_size // model.patch_size[1]) + 1
    return model.depth * n * model.width * 2 * bytes_per_number


def _ratio(s: dict, num: str, den: str, key: str) -> float | None:
    a, b = s.get(num, {}).get(key), s.get(den, {}).get(key)
    return a / b if a and b else None


def run(variant: str, batch: int, image_size: int, reps: int, settings: list[str],
        log: Callable[[str], None] = print,
        model_overrides: Mapping[str, Any] | None = None) -> dict:
    """Measures every setting; returns the JSON-able results.

    Args:
      variant: ViT variant, e.g. 'B/16'.
      batch: examples per step.
      image_size: square image side.
      reps: timed steps per setting (0: memory only).
      settings: names in SETTINGS, measured in this order.
      log: where progress lines go.
      model_overrides: model fields set on top of configs/vtab.py's for every setting (tests
        use it to shrink the model, e.g. depth=2).
    """
    fields = model_fields(model_overrides or {})
    reference = build_model(SETTINGS["vqt"], variant, fields)
    results: dict = dict(
        variant=variant, batch=batch, image_size=image_size, reps=reps,
        device=jax.devices()[0].device_kind, jax_version=jax.__version__,
        model={k: fields[k] for k in ("num_queries", "num_prompts", "adapter_dim", "lora_rank")},
        model_overrides=dict(model_overrides or {}),
        stash_mib=batch * stash_bytes(reference, image_size, 4) / MiB,
        stash_bf16_mib=batch * stash_bytes(reference, image_size, 2) / MiB,
        settings={},
    )
    for name in settings:
        setting = SETTINGS[name]
        model = build_model(setting, variant, fields)
        compiled, num_trainable = compile_setting(setting, model, batch, image_size)
        mem = memory_bytes(compiled)
        secs = None
        if reps:
            args = concrete_args(setting, model, batch, image_size)
            secs = median_step_seconds(compiled, args, reps, setting.train)
            del args  # free this setting's buffers before the next one
        results["settings"][name] = dict(
            method=setting.method, train=setting.train,
            optimizer=methods.get(setting.method).optimizer if setting.train else None,
            num_trainable=num_trainable,
            memory_mib={k: v / MiB for k, v in mem.items()}, step_seconds=secs,
        )
        t = f"{secs:8.3g} s" if secs is not None else "       -"
        log(f"{name:16s} memory {mem['total'] / MiB:9.1f} MiB (temp {mem['temp'] / MiB:8.1f}, "
            f"args {mem['argument'] / MiB:7.1f}, out {mem['output'] / MiB:7.1f}, "
            f"aliased {mem['alias'] / MiB:7.1f})  step {t}")
    _add_ratios(results)
    return results


def _add_ratios(results: dict) -> None:
    """Per-setting multiples of VQT and of the forward, and the targets, into `results`."""
    s = results["settings"]
    totals = {name: {"memory": r["memory_mib"]["total"], "time": r["step_seconds"]}
              for name, r in s.items()}
    for name, r in s.items():
        for ref in ("vqt", "forward"):
            r[f"memory_vs_{ref}"] = _ratio(totals, name, ref, "memory")
            r[f"time_vs_{ref}"] = _ratio(totals, name, ref, "time")
    targets = {}
    for num, den, limit in MEMORY_TARGETS:
        if (value := _ratio(totals, num, den, "memory")) is not None:
            targets[f"memory {num}/{den}"] = dict(value=value, at_most=limit,
                                                  met=value <= limit)
    if "forward" in s and "vqt" in s:
        floor = s["forward"]["memory_mib"]["total"] + results["stash_mib"]
        value = s["vqt"]["memory_mib"]["total"] / floor
        results["vqt_over_forward_plus_stash"] = value
        targets["memory vqt/(forward+stash)"] = dict(value=value, at_most=1 + STASH_SLACK,
                                                     met=value <= 1 + STASH_SLACK)
    num, den, limit = TIME_TARGET
    if (value := _ratio(totals, num, den, "time")) is not None:
        targets[f"time {num}/{den}"] = dict(value=value, at_most=limit, met=value <= limit)
    results["targets"] = targets


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def to_markdown(results: dict) -> str:
    """The table: one row per setting, memory and step time, each also vs VQT and forward."""
    lines = [
        "| setting | optimiser | trainable | memory (MiB) | temp (MiB) | vs VQT | vs forward | "
        "step (s) | vs VQT | vs forward |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["settings"].items():
        secs = "-" if r["step_seconds"] is None else f"{r['step_seconds']:.3g}"
        lines.append(
            f"| {name} | {r['optimizer'] or '(inference)'} | {r['num_trainable']:,} | "
            f"{r['memory_mib']['total']:.1f} | {r['memory_mib']['temp']:.1f} | "
            f"{_x(r['memory_vs_vqt'])} | {_x(r['memory_vs_forward'])} | {secs} | "
            f"{_x(r['time_vs_vqt'])} | {_x(r['time_vs_forward'])} |")
    return "\n".join(lines) + "\n"


def summary_lines(results: dict) -> list[str]:
    """The stash and the targets, one line each."""
    lines = [f"K/V stash (B*M*N*D*2): {results['stash_mib']:.1f} MiB float32, "
             f"{results['stash_bf16_mib']:.1f} MiB bfloat16"]
    for name, t in results["targets"].items():
        verdict = "met" if t["met"] else "NOT MET"
        lines.append(f"target {name}: {t['value']:.3f} (at most {t['at_most']:g}) {verdict}")
    return lines


def parse_model_fields(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings -> {KEY: literal VALUE (a string if it is not a Python literal)}."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model expects KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def parser() -> argparse.ArgumentParser:
    """The command line (README's `python experiments/memory.py [--batch 64] [--json PATH]`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="B/16", help="ViT variant, e.g. B/16 or Ti/16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=3, help="timed steps per setting; 0: no timing")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated subset of: {', '.join(SETTINGS)}")
    parser.add_argument("--model", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="model fields on top of configs/vtab.py's, e.g. num_prompts=50")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point; returns the results (for tests)."""
    parser_ = parser()
    args = parser_.parse_args(argv)
    names = [n for n in args.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser_.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    try:
        overrides = parse_model_fields(args.model)
        model_fields(overrides)  # fail before compiling anything
    except ValueError as e:
        parser_.error(str(e))
    print(f"ViT-{args.variant} at {args.image_size}px, batch {args.batch}, on "
          f"{jax.devices()[0].device_kind} ({jax.device_count()} device(s))"
          + (f", model {overrides}" if overrides else ""))
    res = run(args.variant, args.batch, args.image_size, args.reps, names,
              model_overrides=overrides)
    print()
    print(to_markdown(res))
    for line in summary_lines(res):
        print(line)
    if (args.variant, args.image_size, args.batch) != ("B/16", 224, 64) or overrides:
        # A small model's memory is mostly its weights: the targets only mean something at
        # the paper's size.
        print("(the targets are set for ViT-B/16 at 224, batch 64, with configs/vtab.py's "
              "model fields)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
