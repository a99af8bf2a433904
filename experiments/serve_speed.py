"""Serving many VQT tasks: one backbone pass for all of them against one pass per task, timed.

    python experiments/serve_speed.py --json PATH [--tasks 10] [--batch 16] [--reps 3] [--tiny]

Writes a random ViT-B/16 backbone as a big_vision .npz (time does not depend on the values),
then `--tasks` VQT exports (T=1 query per layer, 10 classes, each its own random queries and
head) on it, and times `serving.Predictor.logits` on a batch of 224 px images (median of
`--reps` after one call that compiles), in one process:
  * one task alone;
  * every task in one predictor: one backbone pass per batch serves them all;
  * every task in its own predictor, one after the other (one backbone pass per task).
It reports seconds per image for each and their ratios to one task alone (target for the
shared pass: at most 1.3x one task). `--tiny` uses a 2-layer model at 32 px (a check that the
script works, no figures).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TINY_MODEL = dict(variant=None, patch_size=(8, 8), width=32, depth=2, mlp_dim=64, num_heads=2)
NUM_CLASSES = 10


def write_exports(root: str, tasks: int, image_size: int, model: dict) -> list[str]:
    """A random backbone and `tasks` VQT exports of random queries and heads on it."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from vqt_jax import checkpoints, export  # noqa: PLC0415
    from vqt_jax import resolve as resolve_lib  # noqa: PLC0415
    from vqt_jax import sweep as sweep_lib  # noqa: PLC0415
    from vqt_jax.checkpoints import synthetic  # noqa: PLC0415
    from vqt_jax.training import train  # noqa: PLC0415

    init = synthetic.write_random_npz(os.path.join(root, "backbone.npz"), image_size, **model)
    config = sweep_lib.load_config_fn(CONFIGS / "vtab.py")("folder")
    config.model.update(model)
    config.model.num_queries = 1
    config.update(method="vqt", init=init, image_size=image_size, data_dir=root)
    config = resolve_lib.resolve(config)  # as a run records it: the exports hold this config
    vit = train.build_model(config, NUM_CLASSES)
    loaded = checkpoints.load(init, train.abstract_variables(vit, config), image_size=image_size)
    provided = export.provided_keys(loaded)
    paths = []
    for i in range(tasks):
        variables = vit.init(jax.random.key(i + 1), jnp.zeros((1, image_size, image_size, 3)))
        paths.append(export.write(
            os.path.join(root, f"task{i}.vqt"), config=config, variables=variables,
            provided=provided, class_names=[f"c{j}" for j in range(NUM_CLASSES)]))
    return paths


def measure(paths: list[str], batch: int, image_size: int, reps: int) -> dict:
    """The three timings (seconds per image) and their ratios to one task."""
    from vqt_jax import serving  # noqa: PLC0415
    from vqt_jax.timing import median_seconds  # noqa: PLC0415

    images = np.random.default_rng(0).normal(size=(batch, image_size, image_size, 3)).astype(
        np.float32)
    one = serving.Predictor(paths[:1], batch_size=batch)
    together = serving.Predictor(paths, batch_size=batch)
    alone = [serving.Predictor([p], batch_size=batch) for p in paths]
    # The shared pass computes what each task alone computes.
    shared = together.logits(images)
    for p, name in zip(alone, together.names, strict=True):
        np.testing.assert_allclose(shared[name], p.logits(images)[p.names[0]], rtol=1e-5,
                                   atol=1e-5)
    out = {"tasks": len(paths), "batch": batch, "image_size": image_size, "reps": reps}
    out["one_task_s_per_image"] = median_seconds(lambda: one.logits(images), reps) / batch
    out["one_pass_s_per_image"] = median_seconds(lambda: together.logits(images), reps) / batch
    out["one_after_another_s_per_image"] = median_seconds(
        lambda: [p.logits(images) for p in alone], reps) / batch
    for k in ("one_pass", "one_after_another"):
        out[f"{k}_ratio"] = round(out[f"{k}_s_per_image"] / out["one_task_s_per_image"], 3)
    return out


def parser() -> argparse.ArgumentParser:
    """The command line (README's `python experiments/serve_speed.py --json PATH`)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="a tiny model (no figures)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    model, size = (TINY_MODEL, 32) if args.tiny else (dict(variant="B/16"), 224)
    with tempfile.TemporaryDirectory(prefix="serve_speed_") as root:
        out = measure(write_exports(root, args.tasks, size, model), args.batch, size, args.reps)
    out["model"] = "tiny" if args.tiny else "B/16"
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
