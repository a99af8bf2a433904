"""The paper's VTAB-1k protocol on many tasks: grid, selection on val, seeds on test, tables.

The sweep (`run_sweep`, the engine of ``experiments/vtab_sweep.py``) runs the paper's VTAB-1k
protocol (each run's settings: `vqt_jax.protocol`) on a list of tasks. For every task:

  1. it trains on train800 and evaluates on val200 (``split='val'``, seed `VAL_SEED`) at every
     (lr, wd) of the method's grid (`grid_for`; for VQT, lr in {1.0, 0.5, 0.25, 0.1, 0.05} x
     batch_size/256 and wd in {0.01, 0.001, 0.0001, 0.0}: 20 runs);
  2. it selects the (lr, wd) with the best final val top-1 (`select_hparams`); ties go to the
     smaller lr, then to the smaller wd. A grid point whose training diverged
     (`FloatingPointError` from the trainer) is recorded as failed and never selected;
  3. it retrains with the selected (lr, wd) on train800val200 and evaluates on test
     (``split='test'``) with seeds 0..N-1, and reports the mean and the sample standard
     deviation of the test top-1. A test run that diverges stops the sweep.

Each stage's runs (the grid, then the seeds) train together as one program when the method
leaves the backbone frozen (VQT, linear probing, Head2Toe) and the cache fits the devices
(`program='auto'`, the default; `vqt_jax.training.stacked`): one compilation per stage, every
batch of cached keys/values read once for all runs, one backbone pass per evaluation split,
and the same per-run outputs and numbers as the runs one by one (`program='sequential'`).

Under the sweep's directory (local, or a ``gs://`` URL: every path is an `etils.epath.Path`
joined as `vqt_jax.workdir.as_path` does, never a `pathlib` one, which would turn
gs://b/s into the local gs:/b/s) it writes ``<task>/val/lr=<lr>,wd=<wd>/`` and
``<task>/test/seed=<s>/`` (one training run each, as `train_and_evaluate` writes it),
``<task>/selection.json`` (every grid point's val top-1 and the selection), ``<task>/sweep.json``
(the method and overrides the task was swept with) and ``results.md`` / ``results.csv``
(`vqt_jax.protocol_tables`: per task, per group, the mean of the group means and the mean over
tasks, under a header naming the runs' protocol and preprocessing).

Re-running is cheap and safe: a run whose ``results.json`` exists is read, not trained again;
an interrupted run is resumed by the trainer from its checkpoints; a diverged run is marked by
`FAILED_MARKER` in its directory and not retried (delete the file to retry). A reused run must
have been trained with the task, split, lr, wd, seed and method its directory stands for (as
its ``results.json`` records them), and a task directory refuses a different method or
overrides than it was swept with, except for `NEUTRAL_KEYS` (where data and caches live, ...).

On several hosts (`jax.distributed`, `experiments/vtab_sweep.py --distributed`) every host
runs the same sweep over a shared workdir (a shared file system or a gs:// bucket): every run
and program trains on all of them, the chief (process 0) alone writes the sweep's files
(markers, selections, tables), and every host waits for the others (`vqt_jax.hosts.barrier`)
after each run before reading what the chief wrote, so all of them take the same decisions
(what to train, what to read, what to select). A re-run resumes on every host from what the
workdir holds: a host reads the chief's results, never a copy of its own.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from etils import epath

from vqt_jax import hosts, methods, protocol
from vqt_jax import resolve as resolve_lib
from vqt_jax import workdir as workdir_lib
from vqt_jax.progress import format_duration
from vqt_jax.protocol_tables import (  # noqa: F401  (re-exported: the sweep's results)
    COMPRESSED_TOP1,
    GROUPS,
    NOT_RECORDED,
    PLAIN_TOP1,
    TaskResult,
    summarize,
    to_csv,
    to_markdown,
    write_reports,
)

ConfigFn = Callable[[str], ml_collections.ConfigDict]
TrainFn = Callable[[ml_collections.ConfigDict, str], Mapping[str, Any]]
# stage_fn(configs, run_dirs, may_diverge) -> per run its results or the FloatingPointError that
# excluded it; None when the runs cannot be one program (it says why).
StageFn = Callable[[Sequence[ml_collections.ConfigDict], Sequence[epath.Path], bool],
                   "list[Mapping[str, Any] | FloatingPointError] | None"]

# How a sweep trains a stage's runs: 'auto' as one program where the method and the cache
# allow it, else one by one; 'one' (an error where it cannot), 'sequential' (one by one).
PROGRAMS = ("auto", "one", "sequential")
LogFn = Callable[[str], None]

# configs/vtab.py of the checkout this package lives in (an editable install or the repository
# itself); callers outside a checkout pass their own `base_config_fn`.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "vtab.py"

# The selection runs use one fixed seed, like the release; the test runs use seeds 0..N-1.
VAL_SEED = 0

# Fields each run sets itself; a user override of one of them would silently be replaced.
RESERVED_KEYS = frozenset({"task", "split", "lr", "wd", "seed", "method"})

# Overrides that change where or how fast a run goes, not its result: left out of the record of
# what a task directory was swept with, so e.g. moving the data does not lock the sweep out.
# The workdir guard's neutral fields, less `prepare`: a run's guard compares configs after the
# preparation filled in what it prepares, but the sweep records its overrides before that.
NEUTRAL_KEYS = workdir_lib.NEUTRAL - {"prepare"}

# Written into a run's workdir when its training diverged, so a re-run does not retrain it.
FAILED_MARKER = "sweep_failed.json"
# A task directory's record of the method and overrides it was swept with, and its selection.
SWEEP_FILE, SELECTION_FILE = "sweep.json", "selection.json"

# An image folder (`--tasks=folder --set data_dir=ROOT`, or a config that prepares one, such as
# configs/demo.py) is swept like a task of its own group; `--tasks=all` means VTAB-1k's 19.
FOLDER_TASK, FOLDER_GROUP = "folder", "custom"


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


def grid_for(method: str) -> Grid:
    """The (lr, wd) grid of `method`: its release's, from its `vqt_jax.methods.Method`
    (`lr_grid`: base lrs per 256 examples, scaled linearly to the batch size as both releases
    do; `wd_grid`). The one place the sweep gets a grid from.

    Raises:
        ValueError: If `method` is not in `vqt_jax.methods.METHODS`.
    """
    spec = methods.get(method)  # an unknown method: ValueError listing the known ones
    return Grid(base_lrs=tuple(spec.lr_grid), wds=tuple(spec.wd_grid))


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
            raise ValueError(f"--set {key}=... is not allowed: the sweep sets "
                             f"{', '.join(sorted(RESERVED_KEYS))} itself (use --tasks / --method "
                             "for task and method).")
        try:
            overrides[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[key] = text
    return overrides


def load_config_fn(path: str | os.PathLike) -> ConfigFn:
    """Returns the ``get_config`` of the config file at `path` (e.g. configs/vtab.py).

    Raises:
        ValueError: `path` is remote (gs://...): a config file is imported as Python, from
            the local file system.
        FileNotFoundError: No such file.
    """
    if not workdir_lib.is_local(path):
        raise ValueError(f"Config file {os.fspath(path)}: a config is imported as Python and "
                         "must be a local file; copy it here first.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    spec = importlib.util.spec_from_file_location(f"_sweep_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config


def vtab_task_groups() -> dict[str, str]:
    """The 19 VTAB-1k task names, in table order, mapped to their group, then `folder`."""
    from vqt_jax.data import tasks as tasks_lib  # noqa: PLC0415 (loads TensorFlow)

    groups = {name: tasks_lib.get_task(name).group for name in tasks_lib.task_names()}
    return {**groups, FOLDER_TASK: FOLDER_GROUP}


def check_tasks(tasks: Sequence[str], task_groups: Mapping[str, str]) -> None:
    """Raises ValueError naming every unknown task and listing the valid ones."""
    if unknown := [t for t in tasks if t not in task_groups]:
        raise ValueError(f"Unknown VTAB-1k task(s): {', '.join(unknown)}. "
                         f"Valid tasks: {', '.join(task_groups)}.")
    if not tasks:
        raise ValueError("No tasks given.")


def resolve_tasks(text: str, task_groups: Mapping[str, str]) -> list[str]:
    """The tasks of a comma-separated list; ``all`` means every task but `FOLDER_TASK`."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    return [t for t in task_groups if t != FOLDER_TASK] if tasks == ["all"] else tasks


# ---------------------------------------------------------------------------------------------
# Runs.


def val_run_dir(workdir: str | os.PathLike, task: str, lr: float, wd: float) -> epath.Path:
    """Workdir of the selection run of `task` at (lr, wd)."""
    return workdir_lib.as_path(workdir) / task / "val" / f"lr={lr!r},wd={wd!r}"


def test_run_dir(workdir: str | os.PathLike, task: str, seed: int) -> epath.Path:
    """Workdir of the test run of `task` with `seed`."""
    return workdir_lib.as_path(workdir) / task / "test" / f"seed={seed}"


def task_run_dirs(workdir: str | os.PathLike, task: str, grid: Grid, batch_size: int,
                  num_seeds: int) -> list[epath.Path]:
    """The workdirs of every run of `task`, in the order the sweep runs them.

    The test runs' directories depend on the seed only, so they are known before the
    selection is.
    """
    return ([val_run_dir(workdir, task, lr, wd) for lr, wd in grid.points(batch_size)]
            + [test_run_dir(workdir, task, seed) for seed in range(num_seeds)])


def _finished(run_dir: epath.Path) -> bool:
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

    def __init__(self, run_dirs: Sequence[str | os.PathLike], log: LogFn | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.run_dirs = [workdir_lib.as_path(d) for d in run_dirs]
        self.total = len(self.run_dirs)
        self.number, self.trained, self.train_seconds = 0, 0, 0.0  # number: current run's, from 1
        self.log = log or _log_info
        self._clock = clock
        self._start = self._run_start = clock()
        self._in_program: set[epath.Path] = set()  # runs trained together by `program_*`

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

    def begin(self, config: ml_collections.ConfigDict, run_dir: epath.Path) -> None:
        """Logs ``run k of N: ...`` for the run of `config` in `run_dir`."""
        self.number += 1
        line = (f"run {self.number} of {self.total}: {config.task} lr={config.lr!r} "
                f"wd={config.wd!r} seed={config.seed} ({config.split})")
        if run_dir in self._in_program:
            line += ": trained in the program above, its results.json is read"
        elif (run_dir / "results.json").is_file():
            line += ": finished earlier, its results.json is read"
        elif (run_dir / FAILED_MARKER).is_file():
            line += f": diverged earlier ({FAILED_MARKER}), not retried"
        self.log(line)
        self._run_start = self._clock()

    def program_begin(self, what: str, run_dirs: Sequence[epath.Path]) -> None:
        """Logs the start of `run_dirs`' runs trained together as one program."""
        self.log(f"{what}: {len(run_dirs)} runs as one program")
        self._run_start = self._clock()

    def program_end(self, run_dirs: Sequence[epath.Path]) -> None:
        """Logs how long the program took; its runs count as trained (for the rate)."""
        seconds = self._clock() - self._run_start
        self.trained += len(run_dirs)
        self.train_seconds += seconds
        self._in_program.update(workdir_lib.as_path(d) for d in run_dirs)
        self.log(f"{len(run_dirs)} runs as one program took {format_duration(seconds)}; "
                 f"{format_duration(self._clock() - self._start)} elapsed")

    def end(self) -> None:
        """Logs the time of the run just trained, the rate so far and the ETA."""
        now = self._clock()
        seconds = now - self._run_start
        self.trained += 1
        self.train_seconds += seconds
        per_run = self.train_seconds / self.trained
        left = self.left_to_train()
        eta = (f"ETA {format_duration(per_run * left)} for {left} run{'s' if left != 1 else ''} "
               "left to train" if left else "no runs left to train")
        self.log(f"run {self.number} of {self.total} took {format_duration(seconds)}; "
                 f"{format_duration(now - self._start)} elapsed, {format_duration(per_run)} "
                 f"per trained run ({self.trained} so far); {eta}")


def run_overrides(base: ml_collections.ConfigDict, *, split: str, lr: float, wd: float,
                  seed: int) -> dict[str, Any]:
    """What the sweep sets in one run's config: its split, lr, wd and seed (and, for a
    selection run, compression off: the release compresses its final runs only, its
    head2toe_sparsity_train.py refuses `final_runs=False`, so the selection reads the trained
    model's val top-1)."""
    overrides: dict[str, Any] = {"split": split, "lr": lr, "wd": wd, "seed": seed}
    if split == "val" and "compression" in base:
        overrides["compression.enabled"] = False
    return overrides


def _run_config(base: ml_collections.ConfigDict, **run: Any) -> ml_collections.ConfigDict:
    """One run's config: `resolve(base, run_overrides(base, **run))`, a copy of its own."""
    return resolve_lib.resolve(base, run_overrides(base, **run))


def reported_of_run(results: Mapping[str, Any]) -> dict[str, Any]:
    """The number a finished run reports: its results.json's 'reported' entry, or (for a
    results.json written before runs recorded it) `reported` of the config it recorded."""
    number = results.get("reported")
    if isinstance(number, Mapping):
        return {"metric": number["metric"], "top1": float(number["top1"])}
    recorded = results.get("config")
    return protocol.reported(recorded if isinstance(recorded, Mapping) else {}, results)


def run_protocol(run_dir: str | os.PathLike, results: Mapping[str, Any] | None = None) -> str:
    """The protocol/preprocessing line (`describe`) of the config a run recorded.

    Args:
        run_dir: The run's workdir.
        results: Its results, if read already.

    Returns:
        `describe` of ``results["config"]``, else of the run's ``config.json`` (a diverged run
        has no results but has one), else `NOT_RECORDED`.
    """
    recorded = (results or {}).get("config")
    if not isinstance(recorded, Mapping):
        path = workdir_lib.as_path(run_dir) / workdir_lib.CONFIG_FILE
        try:
            recorded = workdir_lib.read_json(path) if path.is_file() else None
        except (OSError, ValueError):
            recorded = None  # unreadable: the table says so rather than failing the sweep
    return protocol.describe(recorded) if isinstance(recorded, Mapping) else NOT_RECORDED


def _run_or_read(config: ml_collections.ConfigDict, run_dir: epath.Path, train_fn: TrainFn, *,
                 may_diverge: bool, progress: SweepProgress) -> dict[str, Any] | None:
    """Returns the results of one run, training only if they are not on disk yet.

    Returns None for a run that diverged (only when `may_diverge`): a selection run at too
    high an lr is a legitimate outcome of the grid, not a reason to stop the sweep.

    Raises:
        ValueError: results on disk record other task/split/lr/wd/seed/method than `config`.
    """
    progress.begin(config, run_dir)
    path = run_dir / workdir_lib.RESULTS_FILE
    if path.is_file():
        # A finished run must have been trained with the settings of its directory: those the
        # sweep owns (`RESERVED_KEYS`), read from ``results["config"]`` (the run's whole config)
        # when present, else from the top-level keys of an older results.json.
        results = workdir_lib.read_json(path)
        recorded = results.get("config")
        source = recorded if isinstance(recorded, Mapping) else results
        if wrong := {k: source[k] for k in sorted(RESERVED_KEYS)
                     if k in source and source[k] != config.get(k)}:
            # E.g. a run resumed by hand with a lower lr after diverging: its top-1 would be
            # reported (and maybe selected) under the grid point its directory names.
            raise ValueError(
                f"{path} records {', '.join(f'{k}={v!r}' for k, v in wrong.items())}, but the "
                f"sweep runs {', '.join(f'{k}={config.get(k)!r}' for k in wrong)} there; its "
                f"result would be reported for a setting it was not trained with. Delete "
                f"{path.parent} to retrain it, or use another --workdir.")
        return results
    if (run_dir / FAILED_MARKER).is_file():
        return None
    try:
        # The trainer resumes from run_dir's checkpoints if an earlier attempt was interrupted.
        results = dict(train_fn(config, str(run_dir)))
    except FloatingPointError as e:
        if not may_diverge:
            raise
        _mark_failed(run_dir, e)
        results = None
    # Every host has trained it; the chief's files are complete before anyone reads on.
    hosts.barrier(f"vqt_jax sweep: {run_dir}")
    progress.end()
    return results


def _mark_failed(run_dir: epath.Path, error: FloatingPointError) -> None:
    """Records a diverged run (`FAILED_MARKER`; by the chief alone) so re-runs skip it."""
    logging.warning("Diverged, excluded from the selection: %s (%s)", run_dir, error)
    if hosts.is_chief():
        run_dir.mkdir(parents=True, exist_ok=True)
        workdir_lib.write_json(run_dir / FAILED_MARKER, {"error": str(error)})


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


def program_stage_fn(*, strict: bool = False, log: LogFn | None = None) -> StageFn:
    """The real `StageFn`: `vqt_jax.training.stacked.run_stage`.

    Args:
      strict: a stage that cannot be one program is an error (`program='one'`); otherwise its
        runs train one by one, after a line that says why.
      log: where the lines go.
    """
    log = log or _log_info

    def stage_fn(configs, run_dirs, may_diverge):
        from vqt_jax.training import stacked  # noqa: PLC0415 (the training stack)

        members = [stacked.Member(c, str(d)) for c, d in zip(configs, run_dirs, strict=True)]
        try:
            return stacked.run_stage(members, may_diverge=may_diverge, log=log)
        except stacked.Unstackable as e:
            if strict:
                raise ValueError(
                    f"program='one' but these runs cannot be one program: {e}") from None
            log(f"Training these runs one by one: {e}")
            return None

    return stage_fn


def _program(stage_fn: StageFn | None, runs: Sequence[tuple[ml_collections.ConfigDict, epath.Path]],
             *, may_diverge: bool, progress: SweepProgress, what: str) -> None:
    """Trains the unfinished runs of a stage as one program, if `stage_fn` can (it returns None
    when it cannot, after saying why); the sweep's loop then reads their results."""
    todo = [(c, d) for c, d in runs if not _finished(d)]
    if stage_fn is None or len(todo) < 2:
        return
    progress.program_begin(what, [d for _, d in todo])
    outcomes = stage_fn([c for c, _ in todo], [d for _, d in todo], may_diverge)
    if outcomes is None:
        return
    for (_, run_dir), outcome in zip(todo, outcomes, strict=True):
        if isinstance(outcome, FloatingPointError):  # a grid point that diverged
            _mark_failed(run_dir, outcome)
    hosts.barrier(f"vqt_jax sweep: {what}")  # the chief's files are complete
    progress.program_end([d for _, d in todo])


def sweep_task(task: str, group: str, base: ml_collections.ConfigDict, workdir: str | os.PathLike,
               *, grid: Grid, num_seeds: int, train_fn: TrainFn,
               progress: SweepProgress | None = None,
               stage_fn: StageFn | None = None) -> TaskResult:
    """Runs (or reads) the val grid and the test seeds of one task.

    Args:
        task: Task name.
        group: Its VTAB group, carried into the result.
        base: The task's resolved config (`vqt_jax.resolve`); each run's is
            `resolve(base, run_overrides(...))`.
        workdir: The sweep's root directory, local or remote (gs://).
        grid: The (lr, wd) grid; its lrs are scaled to ``base.batch_size``.
        num_seeds: Number of test seeds (0..num_seeds-1).
        train_fn: ``train_fn(config, run_workdir) -> results`` with a ``'top1'`` entry.
        progress: Numbers and times the runs; default: one for this task's runs alone.
        stage_fn: Trains a stage's unfinished runs (the grid, then the seeds) as one program
            (`program_stage_fn`); None: every run on its own with `train_fn`.

    Returns:
        The selected (lr, wd), its val top-1, the test top-1 of every seed and the protocol
        lines the task's runs recorded.
    """
    if progress is None:
        progress = SweepProgress(task_run_dirs(workdir, task, grid, base.batch_size, num_seeds))
    # The runs leave config.cache_dir as it is: the default (caching.default_cache_dir) is on
    # each host's own disk, never in the sweep's (often shared) workdir, and its entries are
    # named by their contents, so every grid point and seed of a task and split shares one
    # cache of the frozen backbone (vqt_jax/cache.py): the backbone runs once per image.
    protocols: set[str] = set()  # of every run, val included: the selection depends on them
    val_top1: dict[tuple[float, float], float | None] = {}
    points = grid.points(base.batch_size)
    runs = [(_run_config(base, split="val", lr=lr, wd=wd, seed=VAL_SEED),
             val_run_dir(workdir, task, lr, wd)) for lr, wd in points]
    _program(stage_fn, runs, may_diverge=True, progress=progress, what=f"{task}: the grid on val")
    for (lr, wd), (config, run_dir) in zip(points, runs, strict=True):
        results = _run_or_read(config, run_dir, train_fn, may_diverge=True, progress=progress)
        val_top1[(lr, wd)] = None if results is None else float(results["top1"])
        line = run_protocol(run_dir, results)
        # A run that diverged before recording its config says nothing about the protocol:
        # counting it as "not recorded" would flag a disagreement that is not there.
        if results is not None or line != NOT_RECORDED:
            protocols.add(line)
    lr, wd = select_hparams(val_top1)
    progress.log(f"{task}: selected lr={lr!r} wd={wd!r} (val top-1 {val_top1[(lr, wd)]:.4f})")
    if hosts.is_chief():
        workdir_lib.write_json(workdir_lib.as_path(workdir) / task / SELECTION_FILE, {
            "lr": lr, "wd": wd, "val_top1": val_top1[(lr, wd)],
            "grid": [{"lr": k[0], "wd": k[1], "val_top1": v} for k, v in val_top1.items()],
        }, sort_keys=False)

    numbers, plain_top1 = [], []
    runs = [(_run_config(base, split="test", lr=lr, wd=wd, seed=seed),
             test_run_dir(workdir, task, seed)) for seed in range(num_seeds)]
    _program(stage_fn, runs, may_diverge=False, progress=progress,
             what=f"{task}: the seeds on test")
    for config, run_dir in runs:
        results = _run_or_read(config, run_dir, train_fn, may_diverge=False, progress=progress)
        numbers.append(reported_of_run(results))
        plain_top1.append(float(results["top1"]))
        protocols.add(run_protocol(run_dir, results))
    if len(metrics := {n["metric"] for n in numbers}) != 1:
        raise ValueError(f"{task}: its test runs report different numbers ({sorted(metrics)}); "
                         "they were not trained alike. Delete its test/ runs to retrain them.")
    metric = metrics.pop()
    return TaskResult(task, group, lr, wd, val_top1[(lr, wd)],
                      tuple(n["top1"] for n in numbers), tuple(sorted(protocols)), metric=metric,
                      plain_top1=() if metric == PLAIN_TOP1 else tuple(plain_top1))


def run_sweep(tasks: Sequence[str], workdir: str | os.PathLike, *,
              base_config_fn: ConfigFn | None = None, train_fn: TrainFn | None = None,
              method: str = "vqt", num_seeds: int = 5, overrides: Mapping[str, Any] | None = None,
              task_groups: Mapping[str, str] | None = None, log: LogFn | None = None,
              clock: Callable[[], float] = time.monotonic, program: str = "auto",
              stage_fn: StageFn | None = None) -> list[TaskResult]:
    """Runs the VTAB-1k protocol on `tasks` and writes results.md / results.csv in `workdir`.

    Everything that can be checked without training (task names, override keys and types,
    earlier sweeps in the same workdir) is checked for every task before the first run.

    Args:
        tasks: Task names.
        workdir: Root directory of the sweep, local or remote (gs://); see the module
            docstring for its layout.
        base_config_fn: ``get_config(task)``; default: `DEFAULT_CONFIG`'s.
        train_fn: ``train_fn(config, run_workdir) -> results``; default:
            `vqt_jax.training.train.train_and_evaluate`. Tests pass a fake.
        method: Written into every config's ``method`` and selects the grid (`grid_for`).
        num_seeds: Number of test seeds.
        overrides: Dotted config keys to values: every task's base config is
            `resolve(get_config(task), {**overrides, 'task': task, 'method': method})`.
        task_groups: Task name -> group, in report order; default: the VTAB-1k task table.
        log: Where the progress lines go (see `SweepProgress`); default: `logging.info`.
        clock: The time source of the progress lines, in seconds (tests pass a fake one).
        program: One of `PROGRAMS`: whether each stage's runs (the grid, the seeds) train
            together as one program (`vqt_jax.training.stacked`) or one by one.
        stage_fn: What trains a stage as one program; default: `program_stage_fn` with the
            real trainer, none with a `train_fn` given (tests pass fakes of both).

    Returns:
        One `TaskResult` per task, in the order of `task_groups`.

    Raises:
        ValueError: For an unknown task or method, a method without a grid, a reserved
            override key, num_seeds < 1, or a task directory swept earlier with another method
            or overrides.
        KeyError, TypeError: For an override the config does not accept.
    """
    overrides = dict(overrides or {})
    if program not in PROGRAMS:
        raise ValueError(f"program={program!r}: choose from {', '.join(PROGRAMS)}")
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
    # As JSON gives it back (tuples as lists, other objects as their repr), so that it compares
    # equal to what a task directory's SWEEP_FILE stored.
    fingerprint = json.loads(json.dumps({
        "method": method,
        "overrides": {k: v for k, v in overrides.items() if k not in NEUTRAL_KEYS}}, default=repr))

    workdir = workdir_lib.as_path(workdir)  # a gs:// URL mangled to gs:/ is refused here
    bases = {}
    for task in tasks:
        # Resolved (vqt_jax.resolve): the method's release batch size scales its lr grid (and
        # its optimiser and warm-up train every run), unless the config or an override sets
        # them; a preparation (`config.prepare`) runs once here, before any training.
        bases[task] = resolve_lib.resolve(base_config_fn(task),
                                          {**overrides, "task": task, "method": method})
        # Refuses to mix finished runs of a different method or overrides into this sweep.
        path = workdir / task / SWEEP_FILE
        if path.is_file() and (stored := workdir_lib.read_json(path)) != fingerprint:
            raise ValueError(
                f"{workdir / task} was swept with {stored}, not {fingerprint}; its finished runs "
                "would be reused. Use another --workdir (or delete the task directory).")

    real = train_fn is None
    if real:
        # Imported only now: it pulls in the whole training stack.
        from vqt_jax.training.train import train_and_evaluate as train_fn

    progress = SweepProgress([d for task in tasks for d in task_run_dirs(
        workdir, task, grid, bases[task].batch_size, num_seeds)], log=log, clock=clock)
    progress.plan(f"Sweep of {len(tasks)} task{'s' if len(tasks) != 1 else ''} "
                  f"({method}, {num_seeds} seed{'s' if num_seeds != 1 else ''})")
    if program == "sequential":
        stage_fn = None
    elif stage_fn is None and real:
        stage_fn = program_stage_fn(strict=program == "one", log=progress.log)
    # Every host has read the task directories before the chief writes into them.
    hosts.barrier("vqt_jax sweep: checked")
    results = []
    for task in tasks:
        if hosts.is_chief():
            (workdir / task).mkdir(parents=True, exist_ok=True)
            workdir_lib.write_json(workdir / task / SWEEP_FILE, fingerprint, sort_keys=False)
        results.append(sweep_task(task, task_groups[task], bases[task], workdir, grid=grid,
                                  num_seeds=num_seeds, train_fn=train_fn, progress=progress,
                                  stage_fn=stage_fn))
    if hosts.is_chief():
        write_reports(results, workdir, method=method)
    return results
