"""The paper's VTAB-1k protocol as one command: grid search on val, 5-seed retrain, results table.

    python experiments/vtab_sweep.py --tasks=dtd,cifar100 --workdir=DIR \\
        [--method=vqt] [--seeds=5] [--config=configs/vtab.py] [--set KEY=VALUE ...]
        [--program=auto] [--distributed [--coordinator=HOST:PORT --num_processes=N
        --process_id=I]]

For every task (``--tasks=all`` for the 19 of VTAB-1k, ``--tasks=folder`` for an image
folder): train800 -> val200 at every (lr, wd) of the method's grid, the best on val (ties to
the smaller lr, then wd) retrained on train800val200 -> test with seeds 0..N-1 (``--seeds=N``).
DIR gets one directory per run (``<task>/val/lr=..,wd=..``, ``<task>/test/seed=..``), each
task's ``selection.json`` and ``sweep.json``, and ``results.md`` / ``results.csv``: per task,
per group, the mean of the group means and the mean over tasks, under a header naming the
runs' protocol and preprocessing. The markdown is also printed. The protocol itself (grids,
selection, what a re-run reuses, what it refuses) is `vqt_jax.sweep`'s, documented there.

``--program``: ``auto`` (default) trains each stage's runs (the grid, then the seeds) as one
program when the method leaves the backbone frozen (VQT, linear, Head2Toe) and the cache fits
the devices (`vqt_jax.training.stacked`: one compilation, one backbone pass per evaluation
split, the same numbers), else one by one; ``one`` makes the first an error where it cannot
be; ``sequential`` always trains one run at a time.

``--distributed``: run the same command on every host (as main.py's, docs/multihost.md), with
a workdir every host sees (a shared file system, or a ``gs://`` URL: then every file of the
sweep goes to the bucket, and a host's disk holds its caches only: the backbone's features and
compiled programs); every run trains on all hosts together, process 0 writes the sweep's files,
and a re-run resumes on every host from what DIR holds.

Re-running the command is cheap and safe: finished runs are read, interrupted ones resumed,
diverged ones not retried. A task directory remembers the ``--method`` and ``--set`` overrides
it was swept with and refuses another combination (use another DIR), except for overrides that
do not change results (data_dir, num_devices, ...).

``--set KEY=VALUE`` (repeatable, several per flag) overrides a field of the task's config,
dotted for nested fields (``--set model.num_queries=10 epochs=10``); values are parsed with
`ast.literal_eval` and kept as strings if that fails. The sweep owns task, split, lr, wd, seed
and method, so these cannot be set; a ``batch_size`` override rescales the lr grid. Unknown
tasks or config keys fail before anything is trained. Every run trains, and its config.json
records, `vqt_jax.resolve.resolve` of the task's config with these overrides and then with
the run's split, lr, wd and seed (`vqt_jax.sweep.run_overrides`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import logging as absl_logging

from vqt_jax import hosts, methods  # the method table and hosts: no jax, no TensorFlow

# The same file as vqt_jax.sweep.DEFAULT_CONFIG, named here so that `--help` need not import
# the package module (its task table pulls in TensorFlow).
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "vtab.py"


def __getattr__(name: str) -> Any:
    """The protocol's names (`TaskResult`, `write_reports`, ...) as this script's attributes.

    The sweep used to live here: code that loads this script for them keeps working, and
    pays for the package's imports only when it asks.
    """
    if name.startswith("__"):
        raise AttributeError(name)
    from vqt_jax import sweep as sweep_lib

    try:
        return getattr(sweep_lib, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def parser() -> argparse.ArgumentParser:
    """The command line's flags (tests parse README's command with it)."""
    p = argparse.ArgumentParser(
        description="VTAB-1k protocol: lr x wd grid on val, retrain the best on test with "
                    "several seeds, write results.md / results.csv.")
    p.add_argument("--tasks", required=True,
                   help="Comma-separated VTAB-1k task names, 'all', or 'folder'.")
    p.add_argument("--workdir", required=True,
                   help="Root directory of the sweep: local, or a gs:// URL.")
    p.add_argument("--method", default="vqt", choices=list(methods.METHODS),
                   help="Method: config.method of every run, and the grid swept.")
    p.add_argument("--seeds", type=int, default=5, help="Number of test seeds (0..N-1).")
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="Config file with get_config(task).")
    p.add_argument("--program", default="auto", choices=["auto", "one", "sequential"],
                   help="Train each stage's runs as one program (see above).")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                   metavar="KEY=VALUE", help="Config overrides, e.g. model.num_queries=10.")
    # Multi-host (as main.py's flags): every host runs the same command over one workdir.
    p.add_argument("--distributed", action="store_true", default=hosts.wanted(),
                   help="Call jax.distributed.initialize() (multi-host; or "
                        f"{hosts.ENV_DISTRIBUTED}=1).")
    p.add_argument("--coordinator", help="host:port of process 0 (multi-host off Cloud TPU).")
    p.add_argument("--num_processes", type=int,
                   help="Number of processes (multi-host off Cloud TPU).")
    p.add_argument("--process_id", type=int,
                   help="This process's index (multi-host off Cloud TPU).")
    return p


_parser = parser  # the name tests/test_cli.py and older callers use


def main(
    argv: Sequence[str] | None = None,
    *,
    base_config_fn: Callable[[str], ml_collections.ConfigDict] | None = None,
    train_fn: Callable[[ml_collections.ConfigDict, str], Mapping[str, Any]] | None = None,
    task_groups: Mapping[str, str] | None = None,
) -> int:
    """Command-line entry point; the keyword arguments are for tests (see `run_sweep`).

    Returns:
        The exit status (0): errors raise.
    """
    args = parser().parse_args(argv)
    if args.distributed:
        hosts.initialize(args.coordinator, args.num_processes, args.process_id)
    from vqt_jax import cli  # noqa: PLC0415 (after parsing: `--help` and usage errors stay fast)
    from vqt_jax import sweep as sweep_lib  # noqa: PLC0415

    cli.setup_logging()  # main.py's format and quiet libraries
    if not hosts.is_chief():  # every host prints the same lines: only the chief's are read
        absl_logging.set_verbosity(absl_logging.WARNING)

    overrides = sweep_lib.parse_overrides(args.overrides)
    task_groups = sweep_lib.vtab_task_groups() if task_groups is None else task_groups
    results = sweep_lib.run_sweep(
        sweep_lib.resolve_tasks(args.tasks, task_groups), args.workdir,
        base_config_fn=base_config_fn or sweep_lib.load_config_fn(args.config),
        train_fn=train_fn, method=args.method, num_seeds=args.seeds, overrides=overrides,
        task_groups=task_groups, program=args.program,
    )
    if hosts.is_chief():
        print(sweep_lib.to_markdown(results, method=args.method), end="")
    return 0


if __name__ == "__main__":
    from vqt_jax import cli  # noqa: PLC0415 (no jax: XLA's native lines off before its import)

    cli.quiet_native_logs(sys.argv)
    sys.exit(main())
