r"""Classifies images with exported runs (`WORKDIR/model.vqt`), every task in one backbone pass.

  python predict.py --model=runs/dtd/model.vqt [--model=cifar=runs/c100/model.vqt ...] \
      [--backbone=CHECKPOINT] [--top_k=5] [--batch_size=64] [--output=preds.csv|preds.jsonl] \
      IMAGE_OR_FOLDER ...

Folders are searched recursively for images. The backbone is loaded once (from the path the
exports record, or --backbone: its content must be the one they were trained on); VQT tasks
share one backbone forward per batch, other methods run one forward each (it says so). Each
image gets, for every task, its top-k classes with probabilities: printed one line per image
and task, or written to --output as CSV (path, task, rank, class, probability) or JSON lines
({"path", "task", "top": [{"class", "probability"}, ...]}). Files that do not decode are named
and skipped, with a count at the end. Bad input ends with one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
from collections.abc import Sequence

from vqt_jax import cli


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH",
                   help="an exported run (model.vqt); repeat for more tasks")
    p.add_argument("--backbone", help="the backbone checkpoint (default: the exports' own)")
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--output", help="write predictions here: .csv or .jsonl")
    p.add_argument("--log_libraries", action="store_true",
                   help="keep the INFO logs of libraries (jax) and XLA's native log lines")
    return p


def check_output(path: str) -> None:
    """Raises ValueError unless `path` can take the output: a .csv or .jsonl name, not a
    directory, in an existing writable directory."""
    if not path.endswith((".csv", ".jsonl")):
        raise ValueError(f"--output {path}: the name must end in .csv or .jsonl")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"--output {path} is a directory: name a .csv or .jsonl file")
    if not os.path.isdir(parent):
        raise ValueError(f"--output {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--output {path}: cannot write in {parent}; choose a writable --output")


def _writer(path: str | None):
    """(write(prediction), close(complete)) for the output format. The file is written under a
    temporary name and renamed once complete, so a failed run leaves no partial output."""
    if path is None:
        def show(p):
            top = ", ".join(f"{c} {prob:.3f}" for c, prob in p.top)
            print(f"{p.path}\t{p.task}\t{top}")
        return show, lambda complete: None
    from vqt_jax import workdir as workdir_lib  # noqa: PLC0415

    workdir_lib.remove_stale_temps(path)  # of runs killed before their rename
    tmp = f"{path}.tmp-{os.getpid()}"

    @contextlib.contextmanager
    def named():  # an OSError names the user's --output, never the temporary file
        try:
            yield
        except OSError as e:
            raise ValueError(f"cannot write --output {path}: {e.strerror}") from None
    with named():
        f = open(tmp, "w", newline="")
    w = csv.writer(f)

    def close(complete: bool) -> None:
        try:
            with named():
                f.close()
                if complete:
                    os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def write(p):
        with named():
            if path.endswith(".jsonl"):
                f.write(json.dumps({"path": p.path, "task": p.task, "top": [
                    {"class": c, "probability": prob} for c, prob in p.top]}) + "\n")
            else:
                w.writerows([p.path, p.task, rank, c, f"{prob:.6g}"]
                            for rank, (c, prob) in enumerate(p.top, 1))
    try:
        if path.endswith(".csv"):
            with named():
                w.writerow(["path", "task", "rank", "class", "probability"])
    except ValueError:
        close(False)
        raise
    return write, close


def run(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit status (2 for bad input, with one `error:` line)."""
    args = parser().parse_args(argv)
    try:
        if args.output:
            check_output(args.output)
        if args.top_k < 1 or args.batch_size < 1:
            raise ValueError("--top_k and --batch_size must be at least 1")
        return _predict(args)
    except Exception as e:  # noqa: BLE001 (bad input gets one line; anything else is a bug)
        message = cli.user_error(e)
        if message is None:
            raise
        print(f"error: {cli.one_line(message)}", file=sys.stderr)
        return 2


def _predict(args: argparse.Namespace) -> int:
    cli.setup_logging(args.log_libraries)  # main.py's format
    from vqt_jax import serving  # noqa: PLC0415
    from vqt_jax.data import folder  # noqa: PLC0415
    from vqt_jax.progress import Progress  # noqa: PLC0415

    files, skipped = folder.image_files(args.inputs)
    predictor = serving.Predictor(args.model, backbone=args.backbone,
                                  batch_size=args.batch_size)
    bad = folder.find_undecodable(files, "images to classify")
    for path, why in bad:
        print(f"warning: skipping {path}: {why}", file=sys.stderr)
    bad_paths = {p for p, _ in bad}
    good = [p for p in files if p not in bad_paths]
    if not good:
        raise ValueError(f"No image to classify in {', '.join(args.inputs)} ({len(bad)} do not "
                         f"decode, {len(skipped)} other files)")
    write, close = _writer(args.output)
    progress = Progress(f"Classifying for {len(predictor.tasks)} task(s)", len(good), "images")
    complete = False
    try:
        for p in predictor.predict_files(good, args.top_k, on_batch=progress.update):
            write(p)
        complete = True
    finally:
        close(complete)
    progress.done()
    print(f"Classified {len(good)} images for {len(predictor.tasks)} task(s) "
          f"({', '.join(predictor.names)}); skipped {len(bad)} that do not decode"
          + (f" and {len(skipped)} files without an image extension" if skipped else "")
          + (f"; wrote {args.output}" if args.output else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.quiet_native_logs(sys.argv)  # before anything imports jax
    sys.exit(run())
