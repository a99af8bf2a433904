"""main.py's command line: flags, one `error:` line for bad input, `--dry_run`.

    python main.py --config=configs/vtab.py:dtd --workdir=/tmp/vqt/dtd [--config.lr=0.25]

Every problem the user can fix (a config field, the data, the checkpoint, the workdir, the
disk, a diverged run) ends the process with exit status 2 and one line on stderr that starts
with ``error:`` and names the field, file or path; no traceback. Anything else is a bug and
keeps its traceback.

`parse(argv)` and `run(argv)` take their own `flags.FlagValues`, so tests run the exact command
lines of README.md in-process.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging as py_logging
import os
import re
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from vqt_jax import hosts

# Libraries whose INFO lines drown the run's own: orbax logs every save step by step, jax its
# backend probing ("Unable to initialize backend 'tpu'"), etils and grain their set-up.
QUIET_LIBRARIES = ("orbax", "jax", "jaxlib", "etils", "grain")


class UsageError(ValueError):
    """A command line that cannot be parsed (unknown flag or config field, bad value)."""


@dataclasses.dataclass
class Options:
    """A parsed command line."""

    config: ml_collections.ConfigDict
    workdir: str
    dry_run: bool
    distributed: bool
    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    log_libraries: bool
    argv: list[str]


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> flags.FlagValues:
    """Defines main.py's flags on `fv` (the global FLAGS, or a fresh FlagValues in tests).

    `argv`: the command line the config flag takes its `--config.FIELD` overrides from
    (config_flags reads them from sys.argv otherwise).
    """
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vtab.py:dtd.",
                                    lock_config=True, flag_values=fv,
                                    sys_argv=list(argv) if argv is not None else None)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.json.",
                        flag_values=fv)
    flags.DEFINE_bool("dry_run", False, "Check the config, data, checkpoint and workdir, then "
                      "stop before compiling or writing anything.", flag_values=fv)
    flags.DEFINE_bool("distributed", hosts.wanted(),
                      "Call jax.distributed.initialize() (multi-host).", flag_values=fv)
    flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host off Cloud TPU).",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host off Cloud TPU).",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index (multi-host off Cloud TPU).",
                         flag_values=fv)
    flags.DEFINE_bool("log_libraries", False, "Keep the INFO logs of libraries (orbax, jax) and "
                      "XLA's native log lines.", flag_values=fv)
    return fv


def _describe_parse_error(e: BaseException, argv: Sequence[str] = ()) -> str:
    text = str(e).strip()
    # ml_collections reports a misspelled field as AttributeError("'lrr'\nDid you mean ...").
    if isinstance(e, (AttributeError, KeyError)):
        text = text.replace("\\n", "\n").replace("\\'", "'").strip("'\"")
        lines = [x.strip().strip("'\"") for x in text.splitlines() if x.strip()]
        field = lines[0] if lines else text
        hint = f" ({lines[1]})" if len(lines) > 1 else ""
        # Name the whole dotted field as the user typed it.
        names = [arg.split("=")[0].lstrip("-") for arg in argv]
        field = next((n for n in names if n.startswith("config.") and n.split(".")[-1] == field),
                     field)
        return f"{field}: the config has no such field{hint}"
    return re.sub(r"\s+", " ", text)


def parse(argv: Sequence[str], fv: flags.FlagValues | None = None) -> Options:
    """Parses a main.py command line (argv[0] is the program).

    Raises:
      UsageError: an unknown flag or config field, a value of the wrong type, a missing
        --config or --workdir, or a config file that cannot be loaded.
    """
    argv = list(argv)
    fv = fv if fv is not None else define_flags(flags.FlagValues(), argv)
    try:
        fv(argv)  # besides flags.Error, raises as the config file loads or an override applies
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError,
            SyntaxError) as e:
        raise UsageError(_describe_parse_error(e, argv)) from None
    config = fv["config"].value
    if config is None:
        raise UsageError("--config is required, e.g. --config=configs/vtab.py:dtd")
    try:
        # config_flags defers a config file that failed to load to the first use.
        config.to_dict()
    except Exception as e:  # noqa: BLE001 - any failure of the user's config file
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        reason = lines[-1] if lines else type(e).__name__
        raise UsageError(f"cannot load --config={fv['config'].config_filename}: {reason}") from None
    if not fv["workdir"].value:
        raise UsageError("--workdir is required: where checkpoints, logs and results.json go")
    values = {f.name: fv[f.name].value for f in dataclasses.fields(Options) if f.name != "argv"}
    return Options(**values, argv=argv)


class _QuietLibraries(py_logging.Filter):
    """Drops INFO (and finer) records logged from inside the QUIET_LIBRARIES packages."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        path = record.pathname.replace(os.sep, "/")
        return record.levelno >= py_logging.WARNING or not any(
            f"/{name}/" in path for name in QUIET_LIBRARIES)


def setup_logging(libraries: bool = False) -> None:
    """One log format for every command line (absl's), at INFO, libraries quiet (their logs
    kept at warning level: they are most of a run's lines otherwise). It starts no JAX backend:
    a multi-host run initialises after it.

    Args:
      libraries: keep the libraries' INFO lines.
    """
    if not libraries:
        absl_logger = logging.get_absl_logger()
        if not any(isinstance(f, _QuietLibraries) for f in absl_logger.filters):
            absl_logger.addFilter(_QuietLibraries())
        for name in QUIET_LIBRARIES:
            py_logging.getLogger(name).setLevel(py_logging.WARNING)
    logging.use_absl_handler()  # outside app.run (predict.py), absl's format all the same
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # else absl's handler warns of "logging before flag parsing"
    logging.set_verbosity(logging.INFO)


def quiet_native_logs(argv: Sequence[str]) -> None:
    """Keeps XLA's native (C++) info and warning lines off, and with them absl's "All log
    messages before absl::InitializeLog()" notice, unless the command line has
    `--log_libraries` or $TF_CPP_MIN_LOG_LEVEL is set. XLA reads the level as jax is imported:
    call this before anything imports jax (jax's own default shows warnings)."""
    if not any(a.split("=")[0] == "--log_libraries"
               and a.split("=", 1)[-1].lower() not in ("false", "0") for a in argv[1:]):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def user_error(e: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug."""
    from vqt_jax.training import train

    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.errno is not None:
        where = f" {e.filename}" if e.filename else ""
        reason = e.strerror or os.strerror(e.errno)
        if e.errno == errno.ENOSPC:
            return f"no space left on device writing{where}: free space and re-run"
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"cannot write{where}: {reason}; use a writable --workdir"
        return f"{reason}{where}"
    if isinstance(e, (ValueError, FileNotFoundError, train.NonFiniteError)):  # UsageError too
        return str(e)
    if type(e).__module__.startswith("tensorflow") and hasattr(e, "message"):
        # tf.errors.OpError (told by its module, TensorFlow not imported here) from a gs:// read
        # through tf.io.gfile, where TensorFlow is installed: its message names the file.
        return str(e.message)
    return None


def one_line(message: str) -> str:
    """A multi-line message (a list of keys, a command to run) as one line."""
    return re.sub(r"\s*\n\s*", " ", message.strip())


def lower_lr_command(argv: Sequence[str], lr: float) -> str:
    """The same command line with `--config.lr` set to `lr` (replaced, or appended)."""
    flag, out, args = f"--config.lr={lr:g}", [], iter(argv)
    for arg in args:
        if arg == "--config.lr" and next(args, None) is not None:
            out.append(flag)  # a bare flag: its value, the next argument, is consumed above
        else:
            out.append(flag if arg.startswith("--config.lr=") else arg)
    if flag not in out:  # there was no --config.lr to replace
        out.append(flag)
    return ("python " if out[0].endswith(".py") else "") + shlex.join(out)


def run(argv: Sequence[str], fv: flags.FlagValues | None = None) -> int:
    """Runs a main.py command line in this process; returns the exit status.

    Bad input prints one `error:` line on stderr and returns 2.
    """
    try:
        options = parse(argv, fv)
    except UsageError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    return run_options(options)


def run_options(options: Options) -> int:
    """Runs parsed options (see `run`)."""
    setup_logging(options.log_libraries)
    if options.distributed:
        hosts.initialize(options.coordinator, options.num_processes, options.process_id)
    from vqt_jax.training import train

    if not hosts.is_chief():
        logging.set_verbosity(logging.WARNING)  # the other hosts' lines repeat the chief's
    try:
        if options.dry_run:
            plan = train.plan_run(options.config, options.workdir, dry_run=True)
            print(dry_run_summary(plan, options.workdir))
            return 0
        results = train.train_and_evaluate(options.config, options.workdir)
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        message = user_error(e)
        if message is None:
            raise
        if isinstance(e, train.NonFiniteError) and e.resume_step is not None:
            # A lower lr resumes from e.resume_step; say exactly how.
            lower = float(f"{e.lr / 10:.3g}")
            message += f" For example: {lower_lr_command(options.argv, lower)}"
        print(f"error: {one_line(message)}", file=sys.stderr)
        return 2
    if hosts.is_chief():
        print(json.dumps({k: v for k, v in results.items() if k != "config"}, indent=2,
                         sort_keys=True))
        print(summary(results))
    return 0


def dry_run_summary(plan: Any, workdir: str) -> str:
    """What a dry run checked, in a few lines."""
    c = plan.config
    return "\n".join([
        "dry run: the command is valid; nothing was compiled or written.",
        f"  task {c.task} ({c.split}): {plan.num_train} training, {plan.num_eval} evaluation "
        f"examples, {plan.num_classes} classes",
        f"  method {c.method}, model {c.model.get('variant')}, init {c.init or 'random'}",
        f"  devices: {plan.mesh.size}; workdir {workdir}"
        + (" (resumes the recorded run)" if os.path.exists(os.path.join(workdir, "config.json"))
           else " (new)"),
        *(f"  not checked: {note}" for note in plan.notes),
    ])


def summary(results: dict) -> str:
    """One line: the method's top-1, then its compressed head's and the baselines' if any."""
    heads = {results["method"]: results["top1"]}
    if "compression" in results:
        heads[f"{results['method']} (compressed)"] = results["compression"]["top1"]
    heads.update({name: r["top1"] for name, r in results.get("baselines", {}).items()})
    split = "val" if results["split"] == "val" else "test"
    return f"{split} top-1: " + " | ".join(f"{k} {100 * v:.1f}%" for k, v in heads.items())
