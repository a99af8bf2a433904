r"""Figures of a VQT run: query attention maps, a VTAB-1k sweep's accuracies, memory and time.

    python experiments/plot.py --workdir=DIR [--sweep=SWEEP_DIR] [--memory=MEMORY_JSON] \
        [--num_images=4] [--query=-1] [--config=configs/vtab.py:dtd]

Writes, into DIR/plots (or --out), whichever of these its inputs allow:
  * ``query_attention.png``: for a few evaluation images (rows), what each layer's query tokens
    attend to (columns), overlaid on the image. Needs the training run's workdir DIR: the
    workdir holds only the trainable leaves, so the model and its frozen backbone are rebuilt
    from the run's config and the latest checkpoint's queries and head are put back in. The
    config is the one the run recorded in ``DIR/config.json``. ``--config`` (with the same
    overrides as for main.py, e.g. ``--config=configs/vtab.py:dtd --config.data_dir=...``) is
    needed only for a run from before config.json was recorded, or to change a field that does
    not change the run (`vqt_jax.workdir.NEUTRAL`, e.g. a moved ``data_dir``); if it
    differs from the recorded config in any other field, that is an error (the figure would
    show another model than the one trained).
  * ``sweep_accuracy.png``: each task's test top-1 (mean +- std over seeds) and the group means,
    from experiments/vtab_sweep.py's ``results.csv`` in SWEEP_DIR (or the csv itself).
  * ``memory.png``: compiled training memory and step time per setting, from
    experiments/memory.py's ``--json`` output.
  * ``confusion.png``: the run's confusion matrix (rows normalised) with each class's top-1,
    from ``DIR/evaluation.json`` (every run writes it).

A figure whose input is missing is skipped (the reason is printed); it is an error if nothing
at all could be drawn, and also if DIR holds checkpoints but neither config.json nor --config
says what they were trained with. The functions (`query_attention_maps`, `write_plots`, ...)
can be called from a notebook as well.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from vqt_jax import data, methods, resolve
from vqt_jax import trainable as trainable_lib
from vqt_jax import workdir as workdir_lib
from vqt_jax.training import checkpointing, engine, train

ATTENTION_PNG = "query_attention.png"
SWEEP_PNG = "sweep_accuracy.png"
MEMORY_PNG = "memory.png"
CONFUSION_PNG = "confusion.png"

# One colour per VTAB group, so a task's bar says which group it counts towards.
GROUP_COLOURS = {"natural": "tab:green", "specialized": "tab:orange", "structured": "tab:blue"}


def _new_figure(width: float, height: float) -> Figure:
    # A bare Figure on an Agg canvas: no pyplot, so no global backend or figure registry is
    # touched (safe inside a notebook that uses another backend).
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# ---------------------------------------------------------------------------------------------
# Query attention.


def _sown_forward(model, variables, images):
    # The query path sows its attention probabilities only when `intermediates` is mutable.
    return model.apply(variables, images, mutable=["intermediates"])


# Static in the model, so calls with an equal model reuse one compilation.
_jit_sown_forward = jax.jit(_sown_forward, static_argnums=0)
_jit_init = jax.jit(lambda model, rng, x: model.init(rng, x), static_argnums=0)


def _attention_and_logits(model, variables, images) -> tuple[np.ndarray, np.ndarray]:
    """Runs the model once in eval mode; returns (probabilities [B, M, H, T, N], logits)."""
    images = jnp.asarray(images, jnp.float32)
    try:
        hash(model)
    except TypeError:  # e.g. a list-valued attribute: compile for this call only
        logits, state = jax.jit(functools.partial(_sown_forward, model))(variables, images)
    else:
        logits, state = _jit_sown_forward(model, variables, images)
    blocks = state.get("intermediates", {}).get("Transformer", {})
    probs = []
    for m in range(model.depth):
        sown = blocks.get(f"encoderblock_{m}", {}).get("query_attention")
        if not sown:
            raise ValueError(
                f"Layer {m} sowed no query attention: the model has no query tokens "
                f"(num_queries={model.num_queries}); attention maps need a VQT model."
            )
        probs.append(np.asarray(sown[0], np.float32))
    return np.stack(probs, axis=1), np.asarray(logits)


def query_attention(model, variables, images) -> np.ndarray:
    """Every layer's query attention probabilities, as the model computes them.

    Args:
      model: a `vqt_jax.models.ViT` with query tokens (num_queries > 0).
      variables: its variables (backbone, queries, head).
      images: normalised images [B, S, S, 3], as the input pipeline gives them.

    Returns:
      float32 [B, M, H, T, N]: for each image, layer, head and query token, the distribution
      over the N ordinary tokens (class token first if any, then VPT prompts if any, then the
      patch grid row-major); each [..., N] row sums to 1.
    """
    return _attention_and_logits(model, variables, images)[0]


def _patch_grid(model, images) -> tuple[int, int]:
    _, height, width, _ = np.shape(images)
    model.check_image_size(height, width)
    return height // model.patch_size[0], width // model.patch_size[1]


def maps_from_probs(probs: np.ndarray, grid: tuple[int, int], query: int | None = None):
    """Head-averaged attention on the patch grid, from `query_attention`'s probabilities.

    Args:
      probs: [B, M, H, T, N] probabilities.
      grid: the patch grid (gh, gw); the last gh * gw of the N tokens are the patches.
      query: which query token to show; None averages the T queries.

    Returns:
      float32 [B, M, gh, gw]: the probability mass on each patch. The class token's (and the
      prompts') share is left out, not renormalised away, so a map sums to at most 1.
    """
    gh, gw = grid
    a = probs.mean(axis=2)  # heads
    a = a.mean(axis=2) if query is None else a[:, :, query]
    prefix = a.shape[-1] - gh * gw
    if prefix < 0:
        raise ValueError(f"{a.shape[-1]} tokens cannot hold a {gh}x{gw} patch grid")
    return a[..., prefix:].reshape(*a.shape[:2], gh, gw).astype(np.float32)


def query_attention_maps(model, variables, images, query: int | None = None) -> np.ndarray:
    """What each layer's query tokens attend to, on the patch grid.

    Args:
      model: a `vqt_jax.models.ViT` with query tokens (num_queries > 0).
      variables: its variables (backbone, queries, head).
      images: normalised images [B, S, S, 3].
      query: which of the T query tokens to show; None averages them.

    Returns:
      float32 [B, M, gh, gw], averaged over heads; see `maps_from_probs`.
    """
    probs = query_attention(model, variables, images)
    return maps_from_probs(probs, _patch_grid(model, images), query)


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of [..., gh, gw] maps to [..., height, width] (for overlays)."""
    maps = jnp.asarray(maps, jnp.float32)
    return np.asarray(jax.image.resize(maps, (*maps.shape[:-2], *size), "bilinear"))


def denormalize(images: np.ndarray, normalization: Any) -> np.ndarray:
    """Inverts the input pipeline's normalisation: float images -> uint8 [0, 255]."""
    # Normalising the two extreme pixel values with the pipeline's own function gives its
    # per-channel scale and offset, so this stays the exact inverse of whatever it does.
    ends = data.normalize_array(np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8),
                                normalization)[0]
    low, high = ends[0], ends[1]
    pixels = (np.asarray(images, np.float32) - low) / (high - low) * 255.0
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def restore_run(config: ml_collections.ConfigDict,
                workdir: str) -> tuple[Any, dict, ml_collections.ConfigDict, int]:
    """The model and final variables of a training run, rebuilt from its config and workdir.

    The backbone comes from `config.init` (as in training), the trainable leaves (queries,
    head, ...) from the latest checkpoint in `workdir/checkpoints`.

    Args:
      config: the config the run was trained with (e.g. configs/vtab.py's).
      workdir: the run's workdir.

    Returns:
      (model, variables, the resolved config (`vqt_jax.resolve`), the checkpoint's step).

    Raises:
      FileNotFoundError: the workdir has no checkpoint.
      ValueError: the checkpoint does not fit the config's model or method.
    """
    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"No checkpoints in {workdir}: train first (main.py).")
    config = resolve.resolve(config)
    _check_method(config, workdir)
    num_classes = data.get_num_classes(config.task, config.data_dir)
    model = train.build_model(config, num_classes)
    # The same initialisation as train.run, so leaves that no checkpoint covers are identical.
    init_rng, _ = jax.random.split(jax.random.key(config.seed))
    dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    variables = _jit_init(model, init_rng, dummy)
    if config.init:
        variables = train.load_pretrained(config, variables)
    trainable, frozen = trainable_lib.partition(variables, trainable_lib.rule_for(config.method))
    # The checkpoint is the training engine's (a stack of one run), so restoring needs one of
    # the same structure; the optimiser state's structure does not depend on its values.
    mesh = train.make_mesh(config.get("num_devices", 0))
    template = engine.saved(engine.init_state(methods.optimizer_name(config), trainable,
                                              [trainable], mesh), [0], [0.0], mesh,
                            train.config_digest([config]))
    manager = checkpointing.manager(workdir, config.get("keep_checkpoints", 2))
    try:
        if manager.latest_step() is None:
            raise FileNotFoundError(f"No checkpoints in {ckpt_dir}: train first (main.py).")
        try:
            state = checkpointing.restore_latest(manager, template)["state"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"The checkpoint in {ckpt_dir} does not fit the model of this config "
                f"(method {config.method!r}); pass the config the run was trained with. "
                f"({type(e).__name__}: {e})"
            ) from e
    finally:
        manager.close()
    trained = jax.tree.map(lambda x: np.asarray(x)[0], state.trainable)
    return model, trainable_lib.merge(trained, frozen), config, int(np.asarray(state.step)[0])


def _check_method(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses a config whose method or task differs from the one results.json records."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        recorded = json.load(f)
    for key in ("method", "task"):
        if key in recorded and recorded[key] != config.get(key):
            raise ValueError(
                f"{path} records {key}={recorded[key]!r} but the config has "
                f"{key}={config.get(key)!r}: pass the config the run was trained with."
            )


def recorded_config(workdir: str) -> ml_collections.ConfigDict:
    """The config the run in `workdir` recorded in its config.json, with tuples restored.

    JSON has no tuples, so e.g. ``normalization`` ((mean, std)) or ``baselines`` come back as
    lists; as tuples again they compare and hash like the config file's own values (a model
    attribute must be hashable for the jitted forward).

    Raises:
      FileNotFoundError: the workdir has no config.json.
      ValueError: config.json cannot be read.
    """
    return workdir_lib.from_json(workdir_lib.load_config(workdir).to_dict())


def _has_checkpoints(workdir: str) -> bool:
    return os.path.isdir(os.path.join(workdir, "checkpoints"))


def run_config(workdir: str,
               config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """The config to rebuild the run in `workdir` with.

    Args:
      workdir: the run's workdir.
      config: an explicit config (e.g. from --config); None: the one recorded in config.json.

    Returns:
      `config` if given (after its `config.prepare`, as the run applied it), else the recorded
      config.

    Raises:
      FileNotFoundError: no `config` and no config.json in the workdir.
      ValueError: config.json cannot be read, or `config` differs from it in a field that is
        not `vqt_jax.workdir.NEUTRAL` (the message names every such field).
    """
    if config is None:
        return recorded_config(workdir)
    try:
        recorded = recorded_config(workdir)
    except FileNotFoundError:
        return config  # a run from before config.json: the caller's word is all there is
    # The run recorded its resolved config (`vqt_jax.resolve`: `config.prepare`'s paths, e.g.
    # the demo's init, and its method's recipe in the unset optimiser, batch and warm-up), so
    # the explicit config is compared in the same state.
    config = resolve.resolve(config)
    diff = workdir_lib.differences(recorded, config)
    if diff:
        fields = "; ".join(f"{k}: {_show(a)} (recorded) vs {_show(b)} (--config)"
                           for k, (a, b) in diff.items())
        raise ValueError(
            f"--config differs from the config the run in {workdir} was trained with "
            f"({os.path.join(workdir, workdir_lib.CONFIG_FILE)}) in {fields}; the figure would "
            "show another model than the one trained: leave out --config to use the recorded "
            "config")
    return config


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value)


def eval_images(config: ml_collections.ConfigDict, num_images: int):
    """`num_images` examples of the run's evaluation split, normalised, classes mixed.

    One example of each class is taken before any class gets a second, in split order. The
    split is read until `num_images` classes have been seen (or to its end), keeping at most
    `num_images` examples per class: an image folder lists its classes one after the other,
    so its first examples alone would all share one class.

    Returns:
      (images float32 [n, S, S, 3], labels int32 [n]); n may be smaller if the split is.
    """
    kept: dict[int, list[np.ndarray]] = {}
    for batch in data.make_eval_iterator(
        config.task, config.data_dir, config.split, global_batch_size=64,
        image_size=config.image_size, normalization=data.as_normalization(config.normalization),
        process_index=0, process_count=1,
    ):
        for image, label, mask in zip(batch["image"], batch["label"], batch["mask"],
                                      strict=True):
            if mask > 0 and len(kept.setdefault(int(label), [])) < num_images:
                kept[int(label)].append(image)
        if len(kept) >= num_images:
            break
    # Round-robin over the classes in order of first appearance.
    picks = [(rank, c) for c, images in kept.items() for rank in range(len(images))]
    picks = sorted(picks, key=lambda rc: rc[0])[:num_images]
    images = np.stack([kept[c][rank] for rank, c in picks]) if picks else np.zeros((0,))
    return images, np.asarray([c for _, c in picks], np.int32)


def class_names(config: ml_collections.ConfigDict) -> list[str] | None:
    """Class names of an image folder (None for a TFDS task: labels are shown as numbers)."""
    if config.task != data.FOLDER:
        return None
    from vqt_jax.data import folder as folder_lib

    return list(folder_lib.class_names(config.data_dir))


def plot_query_attention(images_uint8: np.ndarray, maps: np.ndarray, path: str, *,
                         titles: Sequence[str] | None = None, query: int | None = None) -> str:
    """Draws a grid: one row per image, the image then one overlay per layer.

    Args:
      images_uint8: [B, S, S, 3] images.
      maps: [B, M, gh, gw] attention maps (see `query_attention_maps`).
      path: the PNG to write.
      titles: one label per image (row), e.g. its class and the prediction.
      query: the query shown (for the title); None: the mean over queries.

    Returns:
      `path`.
    """
    b, m = maps.shape[:2]
    size = images_uint8.shape[1:3]
    overlays = upsample(maps, size)
    cell = 1.6
    fig = _new_figure(cell * (m + 1), cell * b + 0.6)
    axes = fig.subplots(b, m + 1, squeeze=False)
    for i in range(b):
        axes[i, 0].imshow(images_uint8[i])
        axes[i, 0].set_ylabel(titles[i] if titles else f"image {i}", fontsize=8)
        for j in range(m):
            ax = axes[i, j + 1]
            ax.imshow(images_uint8[i])
            # Each panel uses its own colour range: layers differ a lot in how peaked they are.
            ax.imshow(overlays[i, j], cmap="jet", alpha=0.5, interpolation="nearest")
            if i == 0:
                ax.set_title(f"layer {j + 1}", fontsize=9)
    axes[0, 0].set_title("image", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    which = "mean of the queries" if query is None else f"query {query}"
    fig.suptitle(f"Query attention per layer\n({which}, mean of the heads)", fontsize=9)
    return _save(fig, path)


def attention_figure(config: ml_collections.ConfigDict, workdir: str, path: str, *,
                     num_images: int = 4, query: int | None = None) -> str:
    """`query_attention.png` for a training run: restore, take eval images, draw.

    Args:
      config: the config the run was trained with.
      workdir: the run's workdir (with checkpoints).
      path: the PNG to write.
      num_images: how many evaluation images (rows).
      query: which query token; None averages the T queries.

    Returns:
      `path`.
    """
    model, variables, config, _ = restore_run(config, workdir)
    images, labels = eval_images(config, num_images)
    probs, logits = _attention_and_logits(model, variables, images)
    maps = maps_from_probs(probs, _patch_grid(model, images), query)
    names = class_names(config)
    preds = logits.argmax(-1)

    def name(c: int) -> str:
        return names[c] if names and c < len(names) else str(c)

    titles = [f"{name(int(y))}\npred {name(int(p))}" for y, p in zip(labels, preds, strict=True)]
    pixels = denormalize(images, data.as_normalization(config.normalization))
    return plot_query_attention(pixels, maps, path, titles=titles, query=query)


# ---------------------------------------------------------------------------------------------
# VTAB-1k sweep.


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


# The sweep's two averages (vqt_jax/protocol_tables.py), as bar labels.
_SUMMARY_LABELS = {"mean_of_group_means": "mean of groups", "mean_over_tasks": "mean over tasks"}


def read_sweep_csv(path: str) -> tuple[list[dict], list[dict]]:
    """experiments/vtab_sweep.py's results.csv: (task rows, summary rows).

    Each row: name, group, mean, std (test top-1 in %), num_seeds. Rows without a test mean
    are dropped.
    """
    tasks, summaries = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            mean = _float(row.get("test_top1_mean_pct"))
            if mean is None:
                continue
            item = dict(name=row.get("name", "?"), group=row.get("group") or "",
                        mean=mean, std=_float(row.get("test_top1_std_pct")) or 0.0,
                        num_seeds=row.get("num_seeds") or "")
            (tasks if row.get("kind", "task") == "task" else summaries).append(item)
    return tasks, summaries


def plot_sweep(csv_path: str, path: str) -> str:
    """Bar chart of each task's test top-1 (mean +- std over seeds), then the group means.

    Raises:
      ValueError: the csv has no task rows.
    """
    tasks, summaries = read_sweep_csv(csv_path)
    if not tasks:
        raise ValueError(f"{csv_path} has no task rows with a test top-1")
    bars = tasks + summaries
    x = np.arange(len(bars))
    fig = _new_figure(max(5.0, 0.45 * len(bars) + 2), 4.2)
    ax = fig.subplots()
    colours = [GROUP_COLOURS.get(r["group"], "tab:gray") for r in bars]
    ax.bar(x, [r["mean"] for r in bars], yerr=[r["std"] for r in bars], capsize=3,
           color=colours, edgecolor="black", linewidth=0.5)
    for i in range(len(tasks), len(bars)):  # summaries: hatched, so they read as means
        ax.patches[i].set_hatch("//")
    for xi, r in zip(x, bars, strict=True):
        ax.text(xi, r["mean"] + r["std"] + 0.5, f"{r['mean']:.1f}", ha="center", va="bottom",
                fontsize=7)
    labels = [r["name"] for r in tasks] + [
        _SUMMARY_LABELS.get(r["name"], f"{r['name']} mean") for r in summaries]
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, min(105.0, max(r["mean"] + r["std"] for r in bars) + 8))
    seeds = sorted({str(r["num_seeds"]) for r in tasks if r["num_seeds"]})
    # A sweep of image folders only (group 'custom') is not VTAB-1k: do not call it that.
    suite = "VTAB-1k " if any(r["group"] in GROUP_COLOURS for r in bars) else ""
    ax.set_title(f"{suite}test top-1 (mean ± std over {'/'.join(seeds) or '?'} seeds)",
                 fontsize=10)
    handles = [Patch(facecolor=c, edgecolor="black", label=g) for g, c in GROUP_COLOURS.items()
               if any(r["group"] == g for r in bars)]
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="lower right")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Memory and step time.


def read_memory_json(path: str) -> tuple[dict, list[dict]]:
    """experiments/memory.py's --json output: (header, one row per measured setting).

    Each row: name, total/temp/argument/output/alias MiB (any may be None), step seconds (or
    None), and what is recorded of the setting: its method (or None), whether it is a train
    step, its number of trained parameters (or None). Settings without a memory figure (e.g.
    one that failed to compile) are left out.
    """
    with open(path) as f:
        doc = json.load(f)
    settings = doc.get("settings", {})
    if isinstance(settings, list):  # tolerate a list of {"name": ...} entries
        settings = {s.get("name", str(i)): s for i, s in enumerate(settings)}
    rows = []
    for name, s in settings.items():
        if not isinstance(s, Mapping):
            continue
        mem = s.get("memory_mib") or {}
        parts = {k: mem.get(k) for k in ("temp", "argument", "output", "alias")}
        total = mem.get("total")
        if total is None and parts["temp"] is not None and parts["argument"] is not None:
            total = (parts["temp"] + parts["argument"] + (parts["output"] or 0.0)
                     - (parts["alias"] or 0.0))
        if total is None:
            continue
        secs = s.get("step_seconds")
        # Older files have neither `train` nor `method`: only 'forward' was inference there.
        rows.append(dict(name=name, total=float(total), step_seconds=secs,
                         method=s.get("method"), train=s.get("train", name != "forward"),
                         num_trainable=s.get("num_trainable"), **parts))
    header = {k: v for k, v in doc.items() if k != "settings"}
    return header, rows


def _count(n: int) -> str:
    """A parameter count for a label: 915, 12.3K, 85.8M."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def plot_memory(json_path: str, path: str) -> str:
    """Two panels: compiled memory (MiB) and median step time (s) per setting.

    Inference settings are grey, VQT's (alone or combined) red, the other methods blue; a
    setting's label carries its number of trained parameters when recorded.

    Raises:
      ValueError: the file has no setting with a memory figure.
    """
    header, rows = read_memory_json(json_path)
    if not rows:
        raise ValueError(f"{json_path} has no setting with a memory figure")
    names = [r["name"] for r in rows]
    labels = [n if r["num_trainable"] is None or not r["train"]
              else f"{n} ({_count(r['num_trainable'])})" for n, r in zip(names, rows, strict=True)]
    x = np.arange(len(rows))
    fig = _new_figure(max(7.0, 0.9 * len(rows) + 3), 4.2)
    ax_mem, ax_time = fig.subplots(1, 2)
    # Inference grey, VQT's settings red, everything else blue: VQT against the rest.
    colours = ["tab:gray" if not r["train"] else
               ("tab:red" if "vqt" in (r["method"] or r["name"]) else "tab:blue") for r in rows]
    ax_mem.bar(x, [r["total"] for r in rows], color=colours, edgecolor="black", linewidth=0.5)
    for xi, r in zip(x, rows, strict=True):
        ax_mem.text(xi, r["total"], f"{r['total']:.0f}", ha="center", va="bottom", fontsize=7)
    # The physical floor of VQT's backward (forward + every layer's K/V), when recorded.
    stash = header.get("stash_mib")
    if isinstance(stash, (int, float)) and "forward" in names:
        forward = rows[names.index("forward")]["total"]
        ax_mem.axhline(forward + stash, color="black", linestyle="--", linewidth=0.8,
                       label="forward + K/V stash")
        ax_mem.legend(fontsize=7)
    ax_mem.set_ylabel("compiled memory (MiB)")
    ax_mem.set_title("memory per step", fontsize=10)

    timed = [r["step_seconds"] if isinstance(r["step_seconds"], (int, float)) else math.nan
             for r in rows]
    ax_time.bar(x, np.nan_to_num(timed), color=colours, edgecolor="black", linewidth=0.5)
    for xi, t in zip(x, timed, strict=True):
        ax_time.text(xi, 0 if math.isnan(t) else t, "n/a" if math.isnan(t) else f"{t:.3g}",
                     ha="center", va="bottom", fontsize=7)
    ax_time.set_ylabel("median step time (s)")
    ax_time.set_title("time per step", fontsize=10)
    for ax in (ax_mem, ax_time):
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
    what = ", ".join(f"{k} {header[k]}" for k in ("variant", "batch", "image_size", "device")
                     if k in header)
    fig.suptitle(f"Training memory and step time ({what})" if what else
                 "Training memory and step time", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Confusion matrix and per-class top-1.


def plot_confusion(evaluation_json: str, path: str) -> str:
    """The run's confusion matrix (rows: true class, normalised per row) and each class's top-1,
    from its evaluation.json.

    Raises:
      ValueError: the file has no confusion matrix.
    """
    report = json.loads(open(evaluation_json).read())
    if "confusion" not in report:
        raise ValueError(f"{evaluation_json} has no confusion matrix")
    counts = np.asarray(report["confusion"], np.float64)
    names = report["class_names"]
    rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(names)
    side = min(14.0, 3.0 + 0.35 * n)
    fig = _new_figure(side + 1.5, side)
    ax = fig.subplots()
    image = ax.imshow(rows, vmin=0, vmax=1, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 50:  # beyond that the labels overlap; the matrix still shows the structure
        ticks = [f"{c} ({100 * r['top1']:.0f}%)" if r["top1"] is not None else f"{c} (-)"
                 for c, r in zip(names, report["per_class"], strict=True)]
        ax.set_yticks(range(n), ticks, fontsize=7)
        ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (its top-1)")
    ax.set_title(f"{report['split']}: top-1 {100 * report['top1']:.1f}% "
                 f"({report['num_examples']} images)", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# All of them.


def _sweep_csv(sweep: str) -> str:
    return os.path.join(sweep, "results.csv") if os.path.isdir(sweep) else sweep


def write_plots(workdir: str, *, config: ml_collections.ConfigDict | None = None,
                sweep: str | None = None, memory: str | None = None, out_dir: str | None = None,
                num_images: int = 4, query: int | None = None,
                log=print) -> list[str]:
    """Writes every figure whose input exists; returns the paths written.

    Args:
      workdir: a training run's workdir; the figures go to workdir/plots unless `out_dir`.
      config: the run's config; default: the one it recorded in workdir/config.json (see
        `run_config`; without either, or if they differ, the attention figure is skipped).
      sweep: a vtab_sweep.py workdir (or its results.csv).
      memory: a memory.py --json file.
      out_dir: where to write the PNGs.
      num_images: rows of the attention figure.
      query: the query token of the attention figure; None averages them.
      log: called with one line per figure written or skipped.

    Raises:
      ValueError: nothing could be drawn (the message says why for each figure).
    """
    out_dir = out_dir or os.path.join(workdir, "plots")
    written, skipped = [], []

    def attempt(name: str, missing: str | None, draw) -> None:
        if missing:
            skipped.append(f"{name}: {missing}")
            log(f"skipped {name}: {missing}")
            return
        try:
            path = draw(os.path.join(out_dir, name))
        except (FileNotFoundError, ValueError) as e:
            skipped.append(f"{name}: {e}")
            log(f"skipped {name}: {e}")
            return
        written.append(path)
        log(f"wrote {path}")

    # The config is resolved inside the attempt: a workdir without config.json (e.g. a sweep's
    # root, given only for --sweep) skips this figure with the reason, like any missing input.
    attempt(ATTENTION_PNG,
            None if _has_checkpoints(workdir) else f"no checkpoints in {workdir}",
            lambda p: attention_figure(run_config(workdir, config), workdir, p,
                                       num_images=num_images, query=query))
    csv_path = _sweep_csv(sweep) if sweep else None
    attempt(SWEEP_PNG,
            "no --sweep given" if not sweep
            else None if os.path.isfile(csv_path) else f"{csv_path} does not exist",
            lambda p: plot_sweep(csv_path, p))
    attempt(MEMORY_PNG,
            "no --memory given" if not memory
            else None if os.path.isfile(memory) else f"{memory} does not exist",
            lambda p: plot_memory(memory, p))
    evaluation = os.path.join(workdir, workdir_lib.EVALUATION_FILE)
    attempt(CONFUSION_PNG,
            None if os.path.isfile(evaluation) else f"no {evaluation}",
            lambda p: plot_confusion(evaluation, p))
    if not written:
        raise ValueError("No figure could be drawn:\n  " + "\n  ".join(skipped))
    return written


# ---------------------------------------------------------------------------------------------
# Command line.


def parse_flags(argv: Sequence[str]):
    """Parses plot.py's command line into a private absl FlagValues (argv[0] is skipped).

    Private flag values, not absl's global FLAGS, so `main` can be called more than once in
    one process (tests, notebooks) and never clashes with another script's flags.
    """
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "The run's config, as for main.py (e.g. configs/vtab.py:dtd); default: "
        "the one the run recorded in WORKDIR/config.json.",
        flag_values=fv)
    flags.DEFINE_string("workdir", None, "The training run's workdir; figures go to "
                        "WORKDIR/plots.", flag_values=fv)
    flags.DEFINE_string("sweep", None, "experiments/vtab_sweep.py workdir (or its results.csv).",
                        flag_values=fv)
    flags.DEFINE_string("memory", None, "experiments/memory.py --json output.", flag_values=fv)
    flags.DEFINE_string("out", None, "Output directory (default WORKDIR/plots).", flag_values=fv)
    flags.DEFINE_integer("num_images", 4, "Evaluation images in the attention figure.",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("query", -1, "Query token of the attention figure; -1: their mean.",
                         flag_values=fv)
    argv = list(argv)
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(__doc__)
        print(fv.get_help())
        raise SystemExit(0)
    try:
        fv(argv)
    except flags.Error as e:
        raise SystemExit(f"error: {e}\n(see --help)") from None
    if not fv.workdir:
        raise SystemExit("error: --workdir is required (see --help)")
    return fv


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Command-line entry point: `write_plots` with the parsed flags; returns the paths.

    Raises:
      SystemExit: bad flags; a --config that contradicts the run's config.json; a workdir with
        checkpoints but no config to rebuild them with; or no figure could be drawn.
    """
    import sys

    fv = parse_flags(sys.argv if argv is None else argv)
    config = fv.config
    # Checked before anything is drawn: a config that does not describe the checkpoints is a
    # mistake to stop on, not a figure to skip quietly.
    try:
        config = run_config(fv.workdir, config)
    except FileNotFoundError:
        # No config.json: without checkpoints this is no training run (e.g. a sweep's root,
        # given for --sweep), so only the attention figure is skipped; with them it is an
        # older run whose config must be given.
        if _has_checkpoints(fv.workdir):
            raise SystemExit(
                f"error: {os.path.join(fv.workdir, workdir_lib.CONFIG_FILE)} not found: the "
                f"checkpoints in {fv.workdir} come from a run that did not record its config; "
                "pass the config it was trained with (--config=..., with the same overrides "
                "as for main.py)") from None
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        return write_plots(fv.workdir, config=config, sweep=fv.sweep, memory=fv.memory,
                           out_dir=fv.out, num_images=fv.num_images,
                           query=None if fv.query < 0 else fv.query)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
