"""How much faster VQT trains from the cache of the frozen backbone than from images.

    python experiments/cache_speed.py [--images 256] [--batch 128] [--json PATH]

In one run on this machine, for ViT-B/16 at 224 with T=1 query per layer (random weights and
images: time does not depend on the values), it measures:
  * uncached epoch: the jitted VQT train step on images (backbone forward + query path
    forward/backward + Adam), over `--images` images in batches of `--batch`; median of
    `--uncached_epochs` epochs after a warm-up step (images already normalised in memory, so
    the input pipeline costs it nothing);
  * cache build: one pass of the frozen backbone storing every layer's keys/values (in
    `--dtype`, bfloat16 by default) and the final CLS, written to memory-mapped files in a
    temporary directory (what a training run does under its workdir);
  * cached epoch: the jitted VQT train step on cached keys/values, fed by the same batch
    reader training uses (shuffled gather from the memory map, prefetched); median of
    `--cached_epochs` epochs after a warm-up step;
  * loader: the input pipeline alone (a folder of `--images` JPEGs at 500x375, decoded and
    resized to `--image_size`, normalised, batched: the evaluation iterator, as a cache build
    and an uncached run read images), images/s against the backbone forward of the cache
    build and the uncached train step, so it shows whether the loader keeps up;
and prints the cache's size, the per-image times, the ratio uncached/cached epoch, and the
projected end-to-end training time of a VTAB-1k sweep (`--grid_points` (lr, wd) points x
`--epochs` epochs on 800 training images) both ways, from the measured per-image times. With
`--json PATH` the figures are written as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vqt_jax import cache as cache_lib
from vqt_jax import data, timing
from vqt_jax import trainable as trainable_lib
from vqt_jax.models import create_model
from vqt_jax.training import train, train_step

# VTAB-1k: the (lr, wd) grid of the release (5 x 4), 100 epochs, 800 training images (val).
VTAB_TRAIN_IMAGES = 800


def _timed_epochs(run_epoch, epochs: int) -> list[float]:
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        run_epoch()
        times.append(time.perf_counter() - t)
    return times


def loader_images_s(num_images: int, image_size: int, batch: int, root: str) -> float:
    """Images/s of the folder pipeline alone over `num_images` 500x375 JPEGs under `root`."""
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)  # smooth, photo-like content
    for split, n in (("train", 2), ("val", 2), ("test", num_images)):
        for i in range(n):
            d = os.path.join(root, split, f"c{i % 2}")
            os.makedirs(d, exist_ok=True)
            img = Image.fromarray(np.roll(base, i, axis=1)).resize((500, 375), Image.BILINEAR)
            img.save(os.path.join(d, f"{i}.jpg"), quality=90)
    t = time.perf_counter()
    count = sum(int(b["mask"].sum()) for b in data.make_eval_iterator(
        "folder", root, "test", global_batch_size=batch, image_size=image_size))
    return count / (time.perf_counter() - t)


def measure(variant: str = "B/16", image_size: int = 224, num_images: int = 256,
            batch: int = 128, num_queries: int = 1, dtype: str = "bfloat16",
            uncached_epochs: int = 2, cached_epochs: int = 10, num_classes: int = 100,
            grid_points: int = 20, epochs: int = 100) -> dict:
    """Runs the measurements described in the module docstring; returns the figures."""
    if num_images % batch:
        raise ValueError(f"--images={num_images} must be a multiple of --batch={batch}")
    mesh = train.make_mesh(1)
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    model = create_model(variant, num_classes=num_classes, num_queries=num_queries)
    rng = np.random.default_rng(0)
    images_u8 = rng.integers(0, 256, (num_images, image_size, image_size, 3), dtype=np.uint8)
    labels = (np.arange(num_images) % num_classes).astype(np.int32)
    variables = jax.jit(model.init, out_shardings=replicated)(
        jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    trainable, frozen = trainable_lib.partition(variables, trainable_lib.rule_for("vqt"))
    tx = optax.adam(1e-3)
    steps_per_epoch = num_images // batch

    def jitted(from_cache: bool):
        step = train_step.make_train_step(train_step.make_loss_fn(model, from_cache), tx)
        return jax.jit(step, in_shardings=(replicated, replicated, replicated, sharded,
                                           replicated), donate_argnums=(0, 1))

    def normalize(x: np.ndarray) -> np.ndarray:  # the training pipeline's own, to [-1, 1]
        return data.normalize_array(x, "inception")

    # Uncached: images in memory, already normalised.
    images = normalize(images_u8)
    def fresh_state() -> list:  # the steps donate their state: start each from a copy
        t = jax.tree.map(jnp.copy, trainable)
        return [t, tx.init(t)]

    step = jitted(False)
    state = fresh_state()
    key = jax.random.key(1)

    def uncached_epoch():
        for i in range(steps_per_epoch):
            sl = slice(i * batch, (i + 1) * batch)
            b = {"image": jax.device_put(images[sl], sharded),
                 "label": jax.device_put(labels[sl], sharded)}
            state[0], state[1], m = step(state[0], state[1], frozen, b, key)
        jax.block_until_ready(m["loss"])

    t = time.perf_counter()
    b = {"image": jax.device_put(images[:batch], sharded),
         "label": jax.device_put(labels[:batch], sharded)}
    state[0], state[1], m = step(state[0], state[1], frozen, b, key)
    jax.block_until_ready(m["loss"])
    uncached_warmup = time.perf_counter() - t
    uncached_times = _timed_epochs(uncached_epoch, uncached_epochs)

    # The one-time cache.
    spec = cache_lib.spec_for(model, "kv", num_images, image_size, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        cache = cache_lib.build(spec, model, variables, images_u8, labels, mesh=mesh,
                                batch_size=batch, normalize=normalize,
                                path=os.path.join(tmp, "cache"))
        build_time = time.perf_counter() - t
        cache_bytes = sum(os.path.getsize(os.path.join(tmp, "cache", f))
                          for f in os.listdir(os.path.join(tmp, "cache")))

        step = jitted(True)
        state = fresh_state()
        batches = cache_lib.train_batches(cache, global_batch_size=batch, seed=0,
                                          fields=("k", "v", "cls"))

        def cached_epoch():
            for _ in range(steps_per_epoch):
                b = jax.device_put(next(batches), sharded)
                state[0], state[1], m = step(state[0], state[1], frozen, b, key)
            jax.block_until_ready(m["loss"])

        t = time.perf_counter()
        b = jax.device_put(next(batches), sharded)
        state[0], state[1], m = step(state[0], state[1], frozen, b, key)
        jax.block_until_ready(m["loss"])
        cached_warmup = time.perf_counter() - t
        cached_times = _timed_epochs(cached_epoch, cached_epochs)
        batches.close()
        loader = loader_images_s(num_images, image_size, batch, os.path.join(tmp, "folder"))

    uncached = statistics.median(uncached_times)
    cached = statistics.median(cached_times)
    per_image_uncached, per_image_cached = uncached / num_images, cached / num_images
    runs = grid_points * epochs * VTAB_TRAIN_IMAGES
    grid_uncached = runs * per_image_uncached
    grid_cached = VTAB_TRAIN_IMAGES * build_time / num_images + runs * per_image_cached
    return {
        "variant": variant, "image_size": image_size, "num_queries": num_queries,
        "images": num_images, "batch": batch, "cache_dtype": dtype,
        "device": jax.devices()[0].device_kind, "num_cpus": os.cpu_count(),
        "uncached_epoch_s": uncached, "uncached_epochs_s": uncached_times,
        "uncached_first_step_s": uncached_warmup,
        "cache_build_s": build_time, "cache_bytes": cache_bytes,
        "cache_bytes_per_image": cache_bytes / num_images,
        "cached_epoch_s": cached, "cached_epochs_s": cached_times,
        "cached_first_step_s": cached_warmup,
        "speedup_per_epoch": uncached / cached,
        "loader_images_s": loader, "cache_build_images_s": num_images / build_time,
        "uncached_images_s": num_images / uncached, "machine": timing.machine(),
        "grid": {"points": grid_points, "epochs": epochs, "train_images": VTAB_TRAIN_IMAGES,
                 "uncached_s": grid_uncached, "cached_s": grid_cached,
                 "cached_build_s": VTAB_TRAIN_IMAGES * build_time / num_images},
    }


def _report(r: dict) -> str:
    g = r["grid"]
    return "\n".join([
        f"ViT-{r['variant']} at {r['image_size']}, T={r['num_queries']}, {r['images']} images, "
        f"batch {r['batch']}, {r['device']} x {r['num_cpus']} cores",
        f"cache ({r['cache_dtype']}): {r['cache_bytes'] / 2**20:.1f} MiB "
        f"({r['cache_bytes_per_image'] / 2**20:.2f} MiB per image), built in "
        f"{r['cache_build_s']:.1f} s",
        "",
        "| | epoch (s) | per image (ms) |",
        "|---|---|---|",
        f"| uncached | {r['uncached_epoch_s']:.2f} | "
        f"{1e3 * r['uncached_epoch_s'] / r['images']:.2f} |",
        f"| cached | {r['cached_epoch_s']:.3f} | "
        f"{1e3 * r['cached_epoch_s'] / r['images']:.3f} |",
        "",
        f"cached epoch is {r['speedup_per_epoch']:.1f}x faster (target >= 20x)",
        f"images/s: loader alone {r['loader_images_s']:.1f}, cache build's forward "
        f"{r['cache_build_images_s']:.1f}, uncached train step {r['uncached_images_s']:.1f}",
        f"VTAB-1k sweep, {g['points']} points x {g['epochs']} epochs x {g['train_images']} "
        f"images: uncached {g['uncached_s'] / 3600:.1f} h, cached "
        f"{g['cached_s'] / 3600:.2f} h (incl. the {g['cached_build_s']:.0f} s cache build)",
    ])


def parser() -> argparse.ArgumentParser:
    """The command line (README's `python experiments/cache_speed.py [--json PATH]`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--num_queries", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(cache_lib.DTYPES))
    parser.add_argument("--uncached_epochs", type=int, default=2)
    parser.add_argument("--cached_epochs", type=int, default=10)
    parser.add_argument("--grid_points", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    return parser


def main() -> None:
    args = parser().parse_args()
    r = measure(args.variant, args.image_size, args.images, args.batch, args.num_queries,
                args.dtype, args.uncached_epochs, args.cached_epochs,
                grid_points=args.grid_points, epochs=args.epochs)
    print(_report(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
