"""The paper's VTAB-1k protocol as one command: grid search on val, 5-seed retrain, results table.

    python experiments/vtab_sweep.py --tasks=dtd,cifar100 --workdir=DIR \\
        [--method=vqt] [--seeds=5] [--config=configs/vtab.py] [--set KEY=VALUE ...]

For every task (``--tasks=all`` for the 19 of VTAB-1k):
  1. trains on train800 and evaluates on val200 (``split='val'``) at every (lr, wd) of the
     method's grid (`GRIDS`, looked up by ``--method``; for VQT, lr in {1.0, 0.5, 0.25, 0.1,
     0.05} x batch_size/256 and wd in {0.01, 0.001, 0.0001, 0.0}: 20 runs; VPT's grids for
     linear probing, VPT and full fine-tuning), all with seed 0;
  2. selects the (lr, wd) with the best final val top-1; ties go to the smaller lr, then to the
     smaller wd. A grid point whose training diverged (`FloatingPointError` from the trainer) is
     recorded as failed and never selected;
  3. retrains with the selected (lr, wd) on train800val200 and evaluates on test
     (``split='test'``) with seeds 0..N-1 (``--seeds=N``) and reports the mean and the sample
     standard deviation (n - 1 denominator; 0 for one seed) of the test top-1. A test run
     that diverges stops the sweep: the selected setting is expected to train.

It writes, under DIR:
  * ``<task>/val/lr=<lr>,wd=<wd>/`` and ``<task>/test/seed=<s>/``: one training run each
    (checkpoints, logs, ``config.json``, ``results.json``), as written by
    `vqt_jax.training.train.train_and_evaluate`;
  * ``<task>/selection.json``: the val top-1 of every grid point and the selected (lr, wd);
  * ``<task>/sweep.json``: the method and ``--set`` overrides the task was swept with;
  * ``results.md``: a markdown table, one row per task (group, selected lr and wd, val top-1,
    test top-1 mean +- std in %), then the Natural / Specialized / Structured means and the mean
    over all tasks present (each a plain mean of the per-task test means); also printed;
  * ``results.csv``: the same rows, machine-readable (accuracies in %, unrounded).

Re-running the command is cheap and safe: a run whose ``results.json`` exists is read, not
trained again; a run interrupted half-way is resumed by the trainer from its checkpoints (the
sweep calls it again with the same workdir); a diverged run is marked by ``sweep_failed.json``
in its workdir and not retried (delete the file to retry). The selection is recomputed from the
val results every time. A reused run must have been trained with the task, split, lr, wd,
seed and method its directory stands for (as its ``results.json`` records them: its
``"config"``, or the top-level keys of an older file); otherwise the sweep stops and names the
run. Because finished runs are reused, a task directory remembers the ``--method`` and
``--set`` overrides it was swept with and a different combination is refused (e.g. a quick
``--set epochs=10`` check must not leak into the full sweep): use another DIR. Overrides that
do not change results (`NEUTRAL_KEYS`: data_dir, num_devices, ...) may differ.

Progress is logged: the number of runs and how many finished earlier, then
``run k of N: TASK lr=.. wd=.. seed=.. (split)`` before each run and, after each run trained
now, its time, the time elapsed, the mean time per trained run and the ETA of the runs left
to train (runs finished earlier count as done, not towards the rate).

``--set KEY=VALUE`` (repeatable, several per flag) overrides a field of the task's config,
dotted for nested fields (``--set model.num_queries=10 epochs=10``); values are parsed with
`ast.literal_eval` and kept as strings if that fails. The sweep owns task, split, lr, wd, seed
and method, so these cannot be set; a ``batch_size`` override rescales the lr grid. Unknown
tasks or config keys fail before anything is trained.
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import dataclasses
import importlib.util
import io
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from vqt_jax import methods  # the method table only: no jax, no TensorFlow
from vqt_jax.progress import format_duration

ConfigFn = Callable[[str], ml_collections.ConfigDict]
TrainFn = Callable[[ml_collections.ConfigDict, str], Mapping[str, Any]]
LogFn = Callable[[str], None]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "vtab.py"

# VTAB-1k reporting groups, in the order of the task table.
GROUPS = ("natural", "specialized", "structured")

# The selection runs use one fixed seed, like the release; the test runs use seeds 0..N-1.
VAL_SEED = 0

# Fields each run sets itself; a user override of one of them would silently be replaced.
RESERVED_KEYS = frozenset({"task", "split", "lr", "wd", "seed", "method"})

# Overrides that change where or how fast a run goes, not its result: left out of the record of
# what a task directory was swept with, so e.g. moving the data does not lock the sweep out.
NEUTRAL_KEYS = frozenset({"data_dir", "num_devices", "eval_batch_size", "log_every_steps",
                          "checkpoint_every_steps", "keep_checkpoints", "cache", "cache_dir",
                          "cache_storage", "cache_max_gb"})

# Written into a run's workdir when its training diverged, so a re-run does not retrain it.
FAILED_MARKER = "sweep_failed.json"


@dataclasses.dataclass(frozen=True)
class Grid:
    """A method's hyper-parameter grid.

    Attributes:
        base_lrs: Learning rates at `reference_batch_size`; scaled linearly with the batch size.
        wds: Weight decays.
        reference_batch_size: The batch size at which `base_lrs` apply.
    """

    base_lrs: tuple[float, ...]
    wds: tuple[float, ...]
    reference_batch_size: int = 256

    def lrs(self, batch_size: int) -> list[float]:
        """The learning rates for `batch_size`, in the order of `base_lrs`."""
        # Round off the float noise of the scaling (0.1 * 128 / 256) so run directory names and
        # results.json values are the short decimals a user would type.
        return [float(f"{lr * batch_size / self.reference_batch_size:.12g}")
                for lr in self.base_lrs]

    def points(self, batch_size: int) -> list[tuple[float, float]]:
        """All (lr, wd) pairs for `batch_size`, lr-major."""
        return [(lr, wd) for lr in self.lrs(batch_size) for wd in self.wds]


# The releases' (lr, wd) grids. Base lrs are per 256 examples and scaled linearly to the batch
# size, as both releases do (VPT's tune_vtab.py: lr / 256 * batch_size). Each grid goes with its
# release's optimiser, which train.py takes from `vqt_jax.methods.METHODS[method].optimizer`
# (unless config.optimizer is overridden), so the sweep does not set it.
_WDS = (0.01, 0.001, 0.0001, 0.0)
# The VQT release (inherited from VPT's VTAB scripts, with Adam): 5 lrs x 4 wds.
VQT_GRID = Grid(base_lrs=(1.0, 0.5, 0.25, 0.1, 0.05), wds=_WDS)
# VPT's tune_vtab.py, train types 'linear' and 'prompt' (the same set; SGD, momentum 0.9):
# 10 lrs x 4 wds.
VPT_SGD_GRID = Grid(base_lrs=(50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05), wds=_WDS)
# VPT's tune_vtab.py, train type 'finetune' (AdamW): 4 lrs x 4 wds. VPT's base-finetune.yaml
# also warms up for 5 epochs at batch 384; the sweep keeps the config's batch size (128) and
# warm-up for every method, so only the lr scaling follows the batch size.
VPT_FINETUNE_GRID = Grid(base_lrs=(0.001, 0.0001, 0.0005, 0.005), wds=_WDS)

# One grid per method of vqt_jax.methods.METHODS (a test checks that none is missing); a
# method without an entry is refused rather than swept with some other method's grid.
GRIDS: dict[str, Grid] = {
    "vqt": VQT_GRID,
    "vqt+vpt_deep": VQT_GRID,
    "vqt+adaptformer": VQT_GRID,
    "vqt+lora": VQT_GRID,
    "linear": VPT_SGD_GRID,
    "vpt_shallow": VPT_SGD_GRID,
    "vpt_deep": VPT_SGD_GRID,
    "full": VPT_FINETUNE_GRID,
    # No release grid for these here (AdaptFormer, LoRA and Head2Toe were not tuned with
    # these VTAB scripts): VQT's grid, as they train with Adam like VQT.
    "adaptformer": VQT_GRID,
    "lora": VQT_GRID,
    "head2toe": VQT_GRID,
}


def grid_for(method: str) -> Grid:
    """Returns the (lr, wd) grid of `method`.

    Raises:
        ValueError: If `method` is not in `vqt_jax.methods.METHODS`, or has no entry in
            `GRIDS` (add one: there is no default grid).
    """
    methods.get(method)  # an unknown method: ValueError listing the known ones
    if method not in GRIDS:
        raise ValueError(f"No (lr, wd) grid for method {method!r} in GRIDS (experiments/"
                         f"vtab_sweep.py); methods with a grid: {', '.join(GRIDS)}.")
    return GRIDS[method]


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """The outcome of the protocol on one task.

    Attributes:
        task: Task name.
        group: VTAB group: natural, specialized or structured.
        lr: Selected learning rate (already scaled to the batch size).
        wd: Selected weight decay.
        val_top1: Final val200 top-1 in [0, 1] of the selected (lr, wd).
        test_top1: Final test top-1 in [0, 1] of each seed, in seed order.
    """

    task: str
    group: str
    lr: float
    wd: float
    val_top1: float
    test_top1: tuple[float, ...]

    @property
    def mean(self) -> float:
        """Mean test top-1 over the seeds."""
        return statistics.fmean(self.test_top1)

    @property
    def std(self) -> float:
        """Sample standard deviation of the test top-1 over the seeds (0 for a single seed)."""
        return statistics.stdev(self.test_top1) if len(self.test_top1) > 1 else 0.0


# ---------------------------------------------------------------------------------------------
# Configs.


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Parses ``KEY=VALUE`` strings into a dict.

    Values go through `ast.literal_eval` (so ``10`` is an int, ``1e-3`` a float, ``None`` and
    ``(1, 2)`` what they look like) and stay strings if that fails (``bfloat16``, paths).

    Raises:
        ValueError: If an item has no ``=`` or an empty key, or sets a key the sweep owns.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}.")
        if key in RESERVED_KEYS:
            raise ValueError(
                f"--set {key}=... is not allowed: the sweep sets {', '.join(sorted(RESERVED_KEYS))}"
                " itself (use --tasks / --method for task and method)."
            )
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        overrides[key] = value
    return overrides


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """Returns a copy of `config` with the dotted-key `overrides` set.

    Only existing fields can be set, so a typo fails instead of being silently ignored;
    ConfigDict itself rejects a value of the wrong type.

    Raises:
        KeyError: If a key (or one of its parents) is not a field of the config.
        TypeError: If ConfigDict refuses the value's type.
    """
    # Deep copy: ConfigDict(config) would share the nested ConfigDicts (e.g. `model`).
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for depth, name in enumerate(parents):
            child = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
            if not isinstance(child, ml_collections.ConfigDict):
                raise KeyError(f"--set {key}: {'.'.join(parents[:depth + 1])!r} is not a "
                               "nested config.")
            node = child
        if leaf not in node:
            raise KeyError(f"--set {key}: no such config field; fields here: "
                           f"{', '.join(sorted(node.keys()))}.")
        node[leaf] = value
    return config


def load_config_fn(path: str | Path) -> ConfigFn:
    """Returns the ``get_config`` of the config file at `path` (e.g. configs/vtab.py)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    spec = importlib.util.spec_from_file_location(f"_sweep_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config


# An image folder (`--tasks=folder --set data_dir=ROOT`, or a config that prepares one, such as
# configs/demo.py) is swept like a task of its own group; `--tasks=all` means VTAB-1k's 19.
FOLDER_TASK, FOLDER_GROUP = "folder", "custom"


def vtab_task_groups() -> dict[str, str]:
    """The 19 VTAB-1k task names, in table order, mapped to their group, then `folder`."""
    # Imported here: the task table pulls in TensorFlow, which `--help` and tests need not pay.
    from vqt_jax.data import tasks as tasks_lib

    groups = {name: tasks_lib.get_task(name).group for name in tasks_lib.task_names()}
    return {**groups, FOLDER_TASK: FOLDER_GROUP}


def check_tasks(tasks: Sequence[str], task_groups: Mapping[str, str]) -> None:
    """Raises ValueError naming every unknown task and listing the valid ones."""
    unknown = [t for t in tasks if t not in task_groups]
    if unknown:
        raise ValueError(f"Unknown VTAB-1k task(s): {', '.join(unknown)}. "
                         f"Valid tasks: {', '.join(task_groups)}.")
    if not tasks:
        raise ValueError("No tasks given.")


# ---------------------------------------------------------------------------------------------
# Runs.


def val_run_dir(workdir: str | Path, task: str, lr: float, wd: float) -> Path:
    """Workdir of the selection run of `task` at (lr, wd)."""
    return Path(workdir) / task / "val" / f"lr={lr!r},wd={wd!r}"


def test_run_dir(workdir: str | Path, task: str, seed: int) -> Path:
    """Workdir of the test run of `task` with `seed`."""
    return Path(workdir) / task / "test" / f"seed={seed}"


def task_run_dirs(workdir: str | Path, task: str, grid: Grid, batch_size: int,
                  num_seeds: int) -> list[Path]:
    """The workdirs of every run of `task`, in the order the sweep runs them.

    The test runs' directories depend on the seed only, so they are known before the
    selection is.
    """
    return ([val_run_dir(workdir, task, lr, wd) for lr, wd in grid.points(batch_size)]
            + [test_run_dir(workdir, task, seed) for seed in range(num_seeds)])


def _finished(run_dir: Path) -> bool:
    """Whether a run needs no training: its results are on disk, or it diverged earlier."""
    return (run_dir / "results.json").is_file() or (run_dir / FAILED_MARKER).is_file()


def _log_info(message: str) -> None:
    logging.info("%s", message)


class SweepProgress:
    """Numbers the sweep's runs in its log and says how long the rest will take.

    Before each run: ``run k of N: TASK lr=.. wd=.. seed=.. (split)``; after each run it
    trained: how long that run took, the sweep's elapsed time, the mean time per trained run
    and the ETA of the runs still to train. A run finished earlier (its results.json is read)
    or diverged earlier counts towards k but not towards the rate: it costs nothing now, and
    counting it would make a resumed sweep look many times faster than it is.

    Args:
        run_dirs: Every run's workdir, in the order the runs come (see `task_run_dirs`).
        log: Where the lines go (default: `logging.info`).
        clock: The time source, in seconds (tests pass a fake one).
    """

    def __init__(self, run_dirs: Sequence[Path], log: LogFn | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.run_dirs = [Path(d) for d in run_dirs]
        self.total = len(self.run_dirs)
        self.number = 0  # of the current run, 1-based
        self.trained = 0
        self.train_seconds = 0.0
        self.log = log or _log_info
        self._clock = clock
        self._start = clock()
        self._run_start = self._start

    def left_to_train(self) -> int:
        """Runs after the current one that have neither results nor a divergence marker."""
        # Checked on disk each time (a few hundred stat calls at most, against minutes per
        # run), so runs finished by an earlier invocation are never counted as work left.
        return sum(not _finished(d) for d in self.run_dirs[self.number:])

    def plan(self, what: str) -> None:
        """Logs the size of the sweep before its first run."""
        left = self.left_to_train()
        self.log(f"{what}: {self.total} runs, {self.total - left} finished earlier, "
                 f"{left} to train")

    def begin(self, config: ml_collections.ConfigDict, run_dir: Path) -> None:
        """Logs ``run k of N: ...`` for the run of `config` in `run_dir`."""
        self.number += 1
        line = (f"run {self.number} of {self.total}: {config.task} lr={config.lr!r} "
                f"wd={config.wd!r} seed={config.seed} ({config.split})")
        if (run_dir / "results.json").is_file():
            line += ": finished earlier, its results.json is read"
        elif (run_dir / FAILED_MARKER).is_file():
            line += f": diverged earlier ({FAILED_MARKER}), not retried"
        self.log(line)
        self._run_start = self._clock()

    def end(self) -> None:
        """Logs the time of the run just trained, the rate so far and the ETA."""
        now = self._clock()
        seconds = now - self._run_start
        self.trained += 1
        self.train_seconds += seconds
        per_run = self.train_seconds / self.trained
        left = self.left_to_train()
        line = (f"run {self.number} of {self.total} took {format_duration(seconds)}; "
                f"{format_duration(now - self._start)} elapsed, {format_duration(per_run)} "
                f"per trained run ({self.trained} so far)")
        if left:
            line += (f"; ETA {format_duration(per_run * left)} for {left} "
                     f"run{'s' if left != 1 else ''} left to train")
        else:
            line += "; no runs left to train"
        self.log(line)


def _run_config(base: ml_collections.ConfigDict, *, split: str, lr: float, wd: float,
                seed: int) -> ml_collections.ConfigDict:
    config = copy.deepcopy(base)  # every run gets its own config, nested fields included
    config.split, config.lr, config.wd, config.seed = split, lr, wd, seed
    return config


def recorded_settings(results: Mapping[str, Any]) -> dict[str, Any]:
    """The settings the sweep owns (`RESERVED_KEYS`) as a finished run's results record them.

    Taken from ``results["config"]`` (the run's whole config, which the trainer records) when
    present, else from the top-level keys of an older results.json; a key neither has is left
    out.
    """
    recorded = results.get("config")
    source = recorded if isinstance(recorded, Mapping) else results
    return {k: source[k] for k in sorted(RESERVED_KEYS) if k in source}


def _check_recorded(results: Mapping[str, Any], config: ml_collections.ConfigDict,
                    path: Path) -> None:
    """Refuses a finished run that was not trained with the settings of its directory."""
    wrong = {k: v for k, v in recorded_settings(results).items() if v != config.get(k)}
    if wrong:
        # E.g. a run resumed by hand with a lower lr after diverging: its top-1 would be
        # reported (and maybe selected) under the grid point its directory names.
        raise ValueError(
            f"{path} records {', '.join(f'{k}={v!r}' for k, v in wrong.items())}, but the sweep "
            f"runs {', '.join(f'{k}={config.get(k)!r}' for k in wrong)} there; its result would "
            f"be reported for a setting it was not trained with. Delete {path.parent} to "
            "retrain it, or use another --workdir.")


def _run_or_read(config: ml_collections.ConfigDict, run_dir: Path, train_fn: TrainFn, *,
                 may_diverge: bool, progress: SweepProgress) -> dict[str, Any] | None:
    """Returns the results of one run, training only if they are not on disk yet.

    Returns None for a run that diverged (only when `may_diverge`): a selection run at too
    high an lr is a legitimate outcome of the grid, not a reason to stop the sweep.

    Raises:
        ValueError: results on disk record other task/split/lr/wd/seed/method than `config`.
    """
    progress.begin(config, run_dir)
    results_path = run_dir / "results.json"
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        _check_recorded(results, config, results_path)
        return results
    if (run_dir / FAILED_MARKER).is_file():
        return None
    try:
        # The trainer resumes from run_dir's checkpoints if an earlier attempt was interrupted.
        results = dict(train_fn(config, str(run_dir)))
    except FloatingPointError as e:
        if not may_diverge:
            raise
        logging.warning("Diverged, excluded from the selection: %s (%s)", run_dir, e)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / FAILED_MARKER).write_text(json.dumps({"error": str(e)}, indent=2) + "\n")
        results = None
    progress.end()
    return results


def select_hparams(val_top1: Mapping[tuple[float, float], float | None]) -> tuple[float, float]:
    """Picks the (lr, wd) with the best val top-1; ties go to the smaller lr, then smaller wd.

    Args:
        val_top1: Final val top-1 per (lr, wd); None (diverged) or NaN entries are never picked.

    Raises:
        ValueError: If no grid point has a usable val top-1.
    """
    usable = {k: v for k, v in val_top1.items() if v is not None and math.isfinite(v)}
    if not usable:
        raise ValueError("Every grid point diverged or has no val top-1; nothing to select.")
    # Top-1 on val200 moves in steps of 0.005; rounding to 1e-6 only makes equal counts compare
    # equal even if they were summed in a different order, so ties are real ties.
    return min(usable, key=lambda k: (-round(usable[k], 6), k[0], k[1]))


def _check_fingerprint(task_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Refuses to mix finished runs of a different method or overrides into this sweep."""
    path = task_dir / "sweep.json"
    # JSON round trip so that e.g. tuples and lists compare equal to what was stored.
    fingerprint = json.loads(json.dumps(fingerprint, default=repr))
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != fingerprint:
            raise ValueError(
                f"{task_dir} was swept with {stored}, not {fingerprint}; its finished runs "
                "would be reused. Use another --workdir (or delete the task directory)."
            )


def _write_fingerprint(task_dir: Path, fingerprint: dict[str, Any]) -> None:
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / "sweep.json").write_text(json.dumps(fingerprint, indent=2, default=repr) + "\n")


def sweep_task(task: str, group: str, base: ml_collections.ConfigDict, workdir: str | Path, *,
               grid: Grid, num_seeds: int, train_fn: TrainFn,
               progress: SweepProgress | None = None) -> TaskResult:
    """Runs (or reads) the val grid and the test seeds of one task.

    Args:
        task: Task name.
        group: Its VTAB group, carried into the result.
        base: The task's config with the overrides applied; split, lr, wd, seed are set per run.
        workdir: The sweep's root directory.
        grid: The (lr, wd) grid; its lrs are scaled to ``base.batch_size``.
        num_seeds: Number of test seeds (0..num_seeds-1).
        train_fn: ``train_fn(config, run_workdir) -> results`` with a ``'top1'`` entry.
        progress: Numbers and times the runs; default: one for this task's runs alone.

    Returns:
        The selected (lr, wd), its val top-1 and the test top-1 of every seed.
    """
    if progress is None:
        progress = SweepProgress(task_run_dirs(workdir, task, grid, base.batch_size, num_seeds))
    if "cache_dir" in base and not base.cache_dir:
        # One cache of the frozen backbone per task and split, shared by every grid point
        # and seed (vqt_jax/cache.py): the backbone runs once per image, not once per run.
        base = copy.deepcopy(base)
        base.cache_dir = str(Path(workdir) / task / "cache")
    val_top1: dict[tuple[float, float], float | None] = {}
    for lr, wd in grid.points(base.batch_size):
        config = _run_config(base, split="val", lr=lr, wd=wd, seed=VAL_SEED)
        results = _run_or_read(config, val_run_dir(workdir, task, lr, wd), train_fn,
                               may_diverge=True, progress=progress)
        val_top1[(lr, wd)] = None if results is None else float(results["top1"])
    lr, wd = select_hparams(val_top1)
    progress.log(f"{task}: selected lr={lr!r} wd={wd!r} (val top-1 {val_top1[(lr, wd)]:.4f})")
    selection = {
        "lr": lr, "wd": wd, "val_top1": val_top1[(lr, wd)],
        "grid": [{"lr": k[0], "wd": k[1], "val_top1": v} for k, v in val_top1.items()],
    }
    (Path(workdir) / task / "selection.json").write_text(json.dumps(selection, indent=2) + "\n")

    test_top1 = []
    for seed in range(num_seeds):
        config = _run_config(base, split="test", lr=lr, wd=wd, seed=seed)
        results = _run_or_read(config, test_run_dir(workdir, task, seed), train_fn,
                               may_diverge=False, progress=progress)
        test_top1.append(float(results["top1"]))
    return TaskResult(task, group, lr, wd, val_top1[(lr, wd)], tuple(test_top1))


def run_sweep(
    tasks: Sequence[str],
    workdir: str | Path,
    *,
    base_config_fn: ConfigFn | None = None,
    train_fn: TrainFn | None = None,
    method: str = "vqt",
    num_seeds: int = 5,
    overrides: Mapping[str, Any] | None = None,
    task_groups: Mapping[str, str] | None = None,
    log: LogFn | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[TaskResult]:
    """Runs the VTAB-1k protocol on `tasks` and writes results.md / results.csv in `workdir`.

    Everything that can be checked without training (task names, override keys and types,
    earlier sweeps in the same workdir) is checked for every task before the first run.

    Args:
        tasks: Task names.
        workdir: Root directory of the sweep; see the module docstring for its layout.
        base_config_fn: ``get_config(task)``; default: `DEFAULT_CONFIG`'s.
        train_fn: ``train_fn(config, run_workdir) -> results``; default:
            `vqt_jax.training.train.train_and_evaluate`. Tests pass a fake.
        method: Written into every config's ``method`` and selects the grid in `GRIDS`.
        num_seeds: Number of test seeds.
        overrides: Dotted config keys to values, applied to every task's config.
        task_groups: Task name -> group, in report order; default: the VTAB-1k task table.
        log: Where the progress lines go (see `SweepProgress`); default: `logging.info`.
        clock: The time source of the progress lines, in seconds (tests pass a fake one).

    Returns:
        One `TaskResult` per task, in the order of `task_groups`.

    Raises:
        ValueError: For an unknown task or method, a method without a grid, a reserved
            override key, num_seeds < 1, or a task directory swept earlier with another method
            or overrides.
        KeyError, TypeError: For an override the config does not accept.
    """
    overrides = dict(overrides or {})
    if reserved := RESERVED_KEYS.intersection(overrides):
        raise ValueError(f"Overrides may not set {sorted(reserved)}: the sweep sets them.")
    if num_seeds < 1:
        raise ValueError(f"num_seeds must be at least 1, got {num_seeds}.")
    task_groups = vtab_task_groups() if task_groups is None else task_groups
    check_tasks(tasks, task_groups)
    # Report order is the table's (groups stay together), whatever order the user typed.
    tasks = [t for t in task_groups if t in set(tasks)]
    base_config_fn = base_config_fn or load_config_fn(DEFAULT_CONFIG)
    grid = grid_for(method)
    fingerprint = {"method": method,
                   "overrides": {k: v for k, v in overrides.items() if k not in NEUTRAL_KEYS}}

    workdir = Path(workdir)
    bases = {}
    for task in tasks:
        base = apply_overrides(base_config_fn(task), overrides)
        base.task, base.method = task, method
        bases[task] = base
        _check_fingerprint(workdir / task, fingerprint)

    if train_fn is None:
        # Imported only now: it pulls in the whole training stack.
        from vqt_jax.training.train import train_and_evaluate as train_fn

    progress = SweepProgress(
        [d for task in tasks
         for d in task_run_dirs(workdir, task, grid, bases[task].batch_size, num_seeds)],
        log=log, clock=clock)
    progress.plan(f"Sweep of {len(tasks)} task{'s' if len(tasks) != 1 else ''} "
                  f"({method}, {num_seeds} seed{'s' if num_seeds != 1 else ''})")
    results = []
    for task in tasks:
        _write_fingerprint(workdir / task, fingerprint)
        results.append(sweep_task(task, task_groups[task], bases[task], workdir, grid=grid,
                                  num_seeds=num_seeds, train_fn=train_fn, progress=progress))
    write_reports(results, workdir)
    return results


# ---------------------------------------------------------------------------------------------
# Reports.


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """A group mean (natural / specialized / structured) or the mean over all tasks."""

    name: str
    num_tasks: int
    mean: float


def summarize(results: Sequence[TaskResult]) -> list[SummaryRow]:
    """Group means, then the overall mean, of the per-task mean test top-1 (tasks present only).

    The overall mean is over tasks (as VTAB papers' "mean of 19"), not over the group means.
    """
    rows = []
    for group in GROUPS:
        means = [r.mean for r in results if r.group == group]
        if means:
            rows.append(SummaryRow(group, len(means), statistics.fmean(means)))
    if results:
        rows.append(SummaryRow("mean", len(results), statistics.fmean(r.mean for r in results)))
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def to_markdown(results: Sequence[TaskResult]) -> str:
    """The results table in markdown: tasks, then group means and the overall mean."""
    lines = [
        "| task | group | lr | wd | val top-1 (%) | test top-1 (%) | seeds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.task} | {r.group} | {r.lr:g} | {r.wd:g} | {_pct(r.val_top1)} | "
                     f"{_pct(r.mean)} ± {_pct(r.std)} | {len(r.test_top1)} |")
    for row in summarize(results):
        label = "Mean" if row.name == "mean" else row.name.capitalize()
        tasks = f"{row.num_tasks} task" + ("s" if row.num_tasks != 1 else "")
        lines.append(f"| **{label}** ({tasks}) | | | | | **{_pct(row.mean)}** | |")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("name", "kind", "group", "lr", "wd", "val_top1_pct", "test_top1_mean_pct",
              "test_top1_std_pct", "num_seeds", "num_tasks")


def to_csv(results: Sequence[TaskResult]) -> str:
    """The results table as CSV (`CSV_FIELDS`); kind is 'task', 'group' or 'all'."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow(dict(
            name=r.task, kind="task", group=r.group, lr=r.lr, wd=r.wd,
            val_top1_pct=100 * r.val_top1, test_top1_mean_pct=100 * r.mean,
            test_top1_std_pct=100 * r.std, num_seeds=len(r.test_top1), num_tasks=1,
        ))
    for row in summarize(results):
        is_all = row.name == "mean"
        writer.writerow(dict(name=row.name, kind="all" if is_all else "group",
                             group="" if is_all else row.name,
                             test_top1_mean_pct=100 * row.mean, num_tasks=row.num_tasks))
    return out.getvalue()


def write_reports(results: Sequence[TaskResult], workdir: str | Path) -> str:
    """Writes results.md and results.csv into `workdir`; returns the markdown."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(results)
    (workdir / "results.md").write_text(markdown)
    (workdir / "results.csv").write_text(to_csv(results))
    return markdown


# ---------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="VTAB-1k protocol: lr x wd grid on val, retrain the best on test with "
                    "several seeds, write results.md / results.csv.")
    parser.add_argument("--tasks", required=True,
                        help="Comma-separated VTAB-1k task names, or 'all'.")
    parser.add_argument("--workdir", required=True, help="Root directory of the sweep.")
    parser.add_argument("--method", default="vqt", choices=list(methods.METHODS),
                        help="Method: config.method of every run, and its grid in GRIDS.")
    parser.add_argument("--seeds", type=int, default=5, help="Number of test seeds (0..N-1).")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="Config file with get_config(task).")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                        metavar="KEY=VALUE", help="Config overrides, e.g. model.num_queries=10.")
    return parser


def main(argv: Sequence[str] | None = None, *, base_config_fn: ConfigFn | None = None,
         train_fn: TrainFn | None = None, task_groups: Mapping[str, str] | None = None) -> int:
    """Command-line entry point; the keyword arguments are for tests (see `run_sweep`)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overrides = parse_overrides(args.overrides)
    task_groups = vtab_task_groups() if task_groups is None else task_groups
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if tasks == ["all"]:
        tasks = [t for t in task_groups if t != FOLDER_TASK]
    results = run_sweep(
        tasks, args.workdir,
        base_config_fn=base_config_fn or load_config_fn(args.config),
        train_fn=train_fn, method=args.method, num_seeds=args.seeds, overrides=overrides,
        task_groups=task_groups,
    )
    print(to_markdown(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
