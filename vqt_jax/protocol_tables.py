"""The VTAB-1k sweep's reports: per-task results, group means, both overall averages, tables.

`vqt_jax.sweep` runs the sweep and hands one `TaskResult` per task to `write_reports`, which
writes ``results.md`` (`to_markdown`) and ``results.csv`` (`to_csv`) with the same rows:

* one row per task: group, selected lr and wd, val top-1, test top-1 mean +- sample std;
* the mean of each VTAB group present (natural, specialized, structured);
* the **mean of the group means** (each group weighs the same, whatever its number of tasks);
* the **mean over tasks** (each task present weighs the same).

Papers report either of the two averages under the name "mean", and with 7 natural, 4
specialized and 8 structured tasks they differ, so both are given and labelled. The markdown
starts with a header naming the protocol and preprocessing the runs recorded (each task's
`TaskResult.protocols`, from `vqt_jax.protocol.describe`), and says so when the runs disagree.

This module needs neither jax nor TensorFlow: a results table can be rebuilt anywhere.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import statistics
from collections.abc import Sequence

from vqt_jax import workdir as workdir_lib

# VTAB-1k reporting groups, in the order of the task table.
GROUPS = ("natural", "specialized", "structured")

# Names of the two overall averages (CSV `name` column, `SummaryRow.name`).
MEAN_OF_GROUP_MEANS = "mean_of_group_means"
MEAN_OVER_TASKS = "mean_over_tasks"

# The numbers a run can report (`config.report_metric`, `vqt_jax.protocol.reported`): the
# trained model's test top-1, or the compressed model's where the compression stage ran.
PLAIN_TOP1, COMPRESSED_TOP1 = "top1", "compression.top1"
METRIC_NAMES = {PLAIN_TOP1: "trained model", COMPRESSED_TOP1: "compressed model"}

# What a run without a recorded config stands for in `TaskResult.protocols`.
NOT_RECORDED = "not recorded (no config in results.json, no config.json)"


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """The outcome of the protocol on one task.

    Attributes:
        task: Task name.
        group: VTAB group: natural, specialized or structured (or custom, an image folder).
        lr: Selected learning rate (already scaled to the batch size).
        wd: Selected weight decay.
        val_top1: Final val200 top-1 in [0, 1] of the selected (lr, wd).
        test_top1: Final test top-1 in [0, 1] of each seed, in seed order.
        protocols: The distinct protocol/preprocessing lines (`vqt_jax.protocol.describe`) of
            the configs the task's runs recorded, sorted; `NOT_RECORDED` for runs without
            one. Empty when unknown (a result built by hand).
        metric: Which number `test_top1` holds: `PLAIN_TOP1` (the trained model's) or
            `COMPRESSED_TOP1` (the compressed model's), as the runs' protocol reports it.
        plain_top1: With `COMPRESSED_TOP1`, the trained (uncompressed) model's test top-1 of
            each seed, kept beside it; else empty.
    """

    task: str
    group: str
    lr: float
    wd: float
    val_top1: float
    test_top1: tuple[float, ...]
    protocols: tuple[str, ...] = ()
    metric: str = "top1"
    plain_top1: tuple[float, ...] = ()

    @property
    def mean(self) -> float:
        """Mean test top-1 over the seeds."""
        return statistics.fmean(self.test_top1)

    @property
    def plain_mean(self) -> float | None:
        """Mean of `plain_top1`, or None where the reported number is the plain one."""
        return statistics.fmean(self.plain_top1) if self.plain_top1 else None

    @property
    def std(self) -> float:
        """Sample standard deviation of the test top-1 over the seeds (0 for a single seed)."""
        return statistics.stdev(self.test_top1) if len(self.test_top1) > 1 else 0.0


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """A mean over several tasks.

    Attributes:
        name: A group (`GROUPS`), `MEAN_OF_GROUP_MEANS` or `MEAN_OVER_TASKS`.
        kind: 'group' for a group mean, 'all' for the two overall averages.
        num_tasks: Number of tasks it covers.
        mean: The mean test top-1 in [0, 1].
        num_groups: For `MEAN_OF_GROUP_MEANS`, the number of groups averaged; else 0.
    """

    name: str
    kind: str
    num_tasks: int
    mean: float
    num_groups: int = 0


def summarize(results: Sequence[TaskResult]) -> list[SummaryRow]:
    """Group means, the mean of the group means and the mean over tasks (tasks present only).

    Every mean is of the per-task mean test top-1. The mean of the group means covers the VTAB
    groups present (a task of another group, e.g. an image folder, is left out of it); the
    mean over tasks covers every task. Rows with nothing to average are left out.

    Args:
        results: One result per task.

    Returns:
        The group rows in `GROUPS` order, then `MEAN_OF_GROUP_MEANS`, then `MEAN_OVER_TASKS`.
    """
    means = {group: [r.mean for r in results if r.group == group] for group in GROUPS}
    rows = [SummaryRow(g, "group", len(m), statistics.fmean(m)) for g, m in means.items() if m]
    if rows:
        rows.append(SummaryRow(MEAN_OF_GROUP_MEANS, "all", sum(r.num_tasks for r in rows),
                               statistics.fmean(r.mean for r in rows), num_groups=len(rows)))
    if results:
        rows.append(SummaryRow(MEAN_OVER_TASKS, "all", len(results),
                               statistics.fmean(r.mean for r in results)))
    return rows


def protocol_header(results: Sequence[TaskResult]) -> list[str]:
    """The markdown lines that name the runs' protocol and preprocessing.

    One line when every run recorded the same; otherwise a warning and one bullet per
    protocol with its tasks, because rows trained differently are not one protocol's table.
    A result without `protocols` counts as `NOT_RECORDED`.
    """
    found: dict[str, list[str]] = {}  # line -> the tasks with a run that recorded it
    for r in results:
        for line in r.protocols or (NOT_RECORDED,):
            found.setdefault(line, []).append(r.task)
    if len(found) <= 1:
        return [f"Protocol and preprocessing of every run: {next(iter(found), NOT_RECORDED)}."]
    return ["**The runs disagree on protocol or preprocessing**; these rows do not come from "
            "one protocol:", "", *(f"* {line} ({', '.join(t)})" for line, t in found.items())]


def metric_header(results: Sequence[TaskResult]) -> list[str]:
    """The markdown line that says which test top-1 the table reports, per task."""
    compressed = [r.task for r in results if r.metric == COMPRESSED_TOP1]
    if not compressed:
        return ["Test top-1: the trained model's, every task."]
    return [f"Test top-1: the compressed model's (the compression stage after training) for "
            f"{', '.join(compressed)}, as the protocol reports it; the trained model's for "
            "the others. Where the compressed one is reported, the trained model's is in its "
            "own column; the averages are of the reported column."]


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def _summary_label(row: SummaryRow) -> str:
    if row.name == MEAN_OF_GROUP_MEANS:
        # Fewer than three groups is not the number papers report: say which are in it.
        partial = "" if row.num_groups == len(GROUPS) else f" of {len(GROUPS)}"
        return f"**Mean of group means** ({row.num_groups}{partial} groups)"
    name = "Mean over tasks" if row.name == MEAN_OVER_TASKS else row.name.capitalize()
    return f"**{name}** ({row.num_tasks} task{'s' if row.num_tasks != 1 else ''})"


def to_markdown(results: Sequence[TaskResult], *, method: str | None = None) -> str:
    """The results table in markdown, under a header naming the runs' protocol.

    Args:
        results: One result per task, in table order.
        method: The method swept, for the title; None leaves it out.

    Returns:
        A title, the protocol header, the table (tasks, group means, the mean of the group
        means, the mean over tasks) and a note on the two averages.
    """
    # A sweep of image folders only (group 'custom') is not VTAB-1k: do not call it that.
    suite = "VTAB-1k sweep" if any(r.group in GROUPS for r in results) else "Sweep"
    title = suite + (f": {method}" if method else "")
    lines = [f"## {title}", "", *protocol_header(results), "", *metric_header(results), "",
             "| task | group | lr | wd | val top-1 (%) | test top-1 (%) | reported | "
             "trained model's test top-1 (%) | seeds |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    lines += [f"| {r.task} | {r.group} | {r.lr:g} | {r.wd:g} | {_pct(r.val_top1)} | "
              f"{_pct(r.mean)} ± {_pct(r.std)} | {METRIC_NAMES.get(r.metric, r.metric)} | "
              f"{_pct(r.plain_mean)} | {len(r.test_top1)} |" for r in results]
    rows = summarize(results)
    lines += [f"| {_summary_label(row)} | | | | | **{_pct(row.mean)}** | | | |" for row in rows]
    lines += ["", "Test top-1: mean ± sample std over seeds." + (
        " Mean of group means: the average of the group rows (each group weighs the same); "
        "mean over tasks: the average of the task rows (each task weighs the same)."
        if any(row.name == MEAN_OF_GROUP_MEANS for row in rows) else "")]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("name", "kind", "group", "lr", "wd", "val_top1_pct", "test_top1_mean_pct",
              "test_top1_std_pct", "reported", "plain_test_top1_mean_pct", "num_seeds",
              "num_tasks", "num_groups", "protocol")


def to_csv(results: Sequence[TaskResult]) -> str:
    """The rows of `to_markdown` as CSV (`CSV_FIELDS`), accuracies in % and unrounded.

    `kind` is 'task', 'group' or 'all' (the two overall averages, named `MEAN_OF_GROUP_MEANS`
    and `MEAN_OVER_TASKS`); `protocol` is a task's protocol lines joined by '; '; `reported`
    is the results key of the test top-1 (`PLAIN_TOP1` or `COMPRESSED_TOP1`), and
    `plain_test_top1_mean_pct` the trained model's where the compressed one is reported.
    """
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(dict(
        name=r.task, kind="task", group=r.group, lr=r.lr, wd=r.wd,
        val_top1_pct=100 * r.val_top1, test_top1_mean_pct=100 * r.mean,
        test_top1_std_pct=100 * r.std, reported=r.metric,
        plain_test_top1_mean_pct="" if r.plain_mean is None else 100 * r.plain_mean,
        num_seeds=len(r.test_top1), num_tasks=1, protocol="; ".join(r.protocols),
    ) for r in results)
    writer.writerows(dict(name=row.name, kind=row.kind,
                          group=row.name if row.kind == "group" else "",
                          test_top1_mean_pct=100 * row.mean, num_tasks=row.num_tasks,
                          num_groups=row.num_groups or "") for row in summarize(results))
    return out.getvalue()


def write_reports(results: Sequence[TaskResult], workdir: str | os.PathLike, *,
                  method: str | None = None) -> str:
    """Writes results.md and results.csv into `workdir`.

    Args:
        results: One result per task, in table order.
        workdir: The sweep's root directory (created if missing), local or remote (gs://:
            `etils.epath` joins it, where `pathlib` would make gs://b/s the local gs:/b/s).
        method: The method swept, for the markdown's title.

    Returns:
        The markdown.

    Raises:
        ValueError: `workdir` is a gs:// URL that lost a slash (`workdir_lib.is_local`).
    """
    workdir = workdir_lib.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(results, method=method)
    (workdir / "results.md").write_text(markdown)
    (workdir / "results.csv").write_text(to_csv(results))
    return markdown
