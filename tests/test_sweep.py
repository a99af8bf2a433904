"""Tests of the VTAB-1k sweep (vqt_jax/protocol.py, vqt_jax/protocol_tables.py) and its command
line (experiments/vtab_sweep.py) with a fake trainer: no real training, no network."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import ml_collections
import pytest

from tests.scripts import load_script
from vqt_jax import methods, protocol, protocol_tables, resolve
from vqt_jax import sweep as sweep_lib
from vqt_jax import workdir as workdir_lib

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_CONFIG = REPO_ROOT / "configs" / "vtab.py"


cli = load_script("vtab_sweep")  # the command line only; the protocol is the package's

# A small task table with one task per group, so group means can be checked without importing
# the real table (which pulls in TensorFlow); one test checks the real table separately.
TASK_GROUPS = {
    "cifar100": "natural",
    "dtd": "natural",
    "eurosat": "specialized",
    "clevr_count": "structured",
}
SCALED_LRS = [0.5, 0.25, 0.125, 0.05, 0.025]  # {1.0, 0.5, 0.25, 0.1, 0.05} x 128 / 256
WDS = [0.01, 0.001, 0.0001, 0.0]


def standin_config(task: str) -> ml_collections.ConfigDict:
    """The fields of configs/vtab.py the sweep relies on."""
    c = ml_collections.ConfigDict()
    c.task = task
    c.data_dir = None
    c.split = "test"
    c.init = ""
    c.model = ml_collections.ConfigDict({"num_queries": 1, "variant": "B/16"})
    c.method = "vqt"
    c.lr = 0.125
    c.wd = 1e-3
    c.batch_size = 128
    c.epochs = 100
    c.warmup_epochs = 10
    c.seed = 0
    c.normalization = "inception"
    c.image_size = 224
    return c


def base_config_fn():
    """The real configs/vtab.py when it exists (the lead is writing it), else the stand-in."""
    if REAL_CONFIG.is_file():
        return sweep_lib.load_config_fn(REAL_CONFIG)
    return standin_config


def default_val_top1(task: str, lr: float, wd: float) -> float:
    """A val surface with a unique best at (0.125, 0.001) for every task (and any batch size)."""
    return 0.9 - 0.05 * abs(math.log2(lr / 0.125)) - 0.02 * abs(WDS.index(wd) - 1)


# How far below the trained model's top-1 the fake trainer puts a compressed model's.
COMPRESSION_DROP = 0.03


def default_test_top1(task: str, lr: float, wd: float, seed: int) -> float:
    rank = list(TASK_GROUPS).index(task) if task in TASK_GROUPS else 0
    return 0.5 + 0.1 * rank + 0.01 * seed + lr / 10 + wd


class FakeClock:
    """A clock that moves only when told to (the fake trainer's runs take exact times)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTrainer:
    """Stands in for train_and_evaluate: writes results.json, returns a deterministic top-1.

    Like the real trainer, results.json carries the run's whole config under "config" (unless
    `with_config` is False: the older format); with a `clock`, each run takes `seconds`.
    """

    def __init__(self, val_top1=default_val_top1, test_top1=default_test_top1,
                 fail_after: int | None = None, with_config: bool = True,
                 clock: FakeClock | None = None, seconds: float = 10.0):
        self.val_top1 = val_top1
        self.test_top1 = test_top1
        self.fail_after = fail_after  # raise (an "interruption") on call number fail_after + 1
        self.with_config = with_config
        self.clock, self.seconds = clock, seconds
        self.calls: list[tuple[ml_collections.ConfigDict, str]] = []

    def __call__(self, config: ml_collections.ConfigDict, workdir: str) -> dict:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("interrupted")
        self.calls.append((config, workdir))
        if self.clock is not None:
            self.clock.now += self.seconds
        if config.split == "val":
            top1 = self.val_top1(config.task, config.lr, config.wd)
        else:
            top1 = self.test_top1(config.task, config.lr, config.wd, config.seed)
        results = {"task": config.task, "split": config.split, "seed": config.seed,
                   "lr": config.lr, "wd": config.wd, "top1": top1}
        if "compression" in config and config.compression.enabled:
            # A compressed model's top-1 apart from the trained model's, as the heads give it.
            results["compression"] = {"top1": top1 - COMPRESSION_DROP}
        if self.with_config:
            # What train.record_run adds (an older results.json has neither).
            results["reported"] = protocol.reported(config, results)
            results["config"] = workdir_lib.as_dict(config)
        Path(workdir).mkdir(parents=True, exist_ok=True)
        (Path(workdir) / "results.json").write_text(json.dumps(results))
        return results

    def runs(self, split: str) -> list[ml_collections.ConfigDict]:
        return [c for c, _ in self.calls if c.split == split]


def run(tmp_path, tasks=("dtd",), trainer=None, **kwargs):
    trainer = trainer or FakeTrainer()
    kwargs.setdefault("base_config_fn", base_config_fn())
    kwargs.setdefault("task_groups", TASK_GROUPS)
    kwargs.setdefault("num_seeds", 3)
    results = sweep_lib.run_sweep(list(tasks), tmp_path, train_fn=trainer, **kwargs)
    return results, trainer


def test_vqt_grid_has_20_points_scaled_by_batch_size():
    grid = sweep_lib.grid_for("vqt")
    points = grid.points(128)
    assert len(points) == len(set(points)) == 20
    assert sorted({lr for lr, _ in points}, reverse=True) == SCALED_LRS
    assert sorted({wd for _, wd in points}, reverse=True) == WDS
    assert grid.lrs(256) == [1.0, 0.5, 0.25, 0.1, 0.05]


VPT_SGD_LRS = [50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05]


def test_every_method_has_its_release_grid():
    # From the method's lr_grid / wd_grid (vqt_jax/methods.py).
    base = {m: sorted(sweep_lib.grid_for(m).lrs(256), reverse=True) for m in methods.METHODS}
    for m in methods.METHODS:
        assert sorted(sweep_lib.grid_for(m).wds, reverse=True) == WDS, m
    # VPT's tune_vtab.py: 'linear' and 'prompt' (SGD), 'finetune' (AdamW).
    for m in ("linear", "vpt_shallow", "vpt_deep"):
        assert base[m] == VPT_SGD_LRS, m
        assert methods.METHODS[m].optimizer == "sgd"
    assert base["full"] == [0.005, 0.001, 0.0005, 0.0001]
    assert methods.METHODS["full"].optimizer == "adamw"
    # The VQT release's grid (Adam) for VQT, its combinations and the methods without a
    # release grid of their own.
    for m in ("vqt", "vqt+vpt_deep", "vqt+adaptformer", "vqt+lora", "adaptformer", "lora",
              "head2toe"):
        assert base[m] == [1.0, 0.5, 0.25, 0.1, 0.05], m
        assert methods.METHODS[m].optimizer == "adam"
    assert len(sweep_lib.grid_for("vpt_deep").points(128)) == 40
    assert sorted(sweep_lib.grid_for("vpt_deep").lrs(128), reverse=True)[:2] == [25.0, 12.5]
    assert len(sweep_lib.grid_for("full").points(128)) == 16
    assert sorted(sweep_lib.grid_for("full").lrs(128)) == [0.00005, 0.00025, 0.0005, 0.0025]


def test_a_methods_grid_comes_from_its_method(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "lora", SimpleNamespace(lr_grid=(0.3, 0.03),
                                                                 wd_grid=(0.1,)))
    assert sweep_lib.grid_for("lora") == sweep_lib.Grid((0.3, 0.03), (0.1,))
    assert sweep_lib.grid_for("lora").lrs(128) == [0.15, 0.015]


def test_unknown_method_fails_before_training(tmp_path):
    trainer = FakeTrainer()
    with pytest.raises(ValueError, match="Unknown method 'vpt_medium'"):
        run(tmp_path, trainer=trainer, method="vpt_medium")
    assert trainer.calls == []
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit):  # the command line offers only the known methods
        cli.main([f"--workdir={tmp_path}", "--tasks=dtd", "--method=vpt_medium"],
                 base_config_fn=base_config_fn(), train_fn=trainer, task_groups=TASK_GROUPS)


def test_method_flag_reaches_every_run_and_selects_its_grid(tmp_path, capsys):
    trainer = FakeTrainer()
    cli.main([f"--workdir={tmp_path}", "--tasks=dtd", "--seeds=1", "--method=vpt_deep"],
             base_config_fn=base_config_fn(), train_fn=trainer, task_groups=TASK_GROUPS)
    assert {c.method for c, _ in trainer.calls} == {"vpt_deep"}
    assert sorted({c.lr for c in trainer.runs("val")}, reverse=True) == [
        lr * 128 / 256 for lr in VPT_SGD_LRS]
    assert len(trainer.runs("val")) == 40 and len(trainer.runs("test")) == 1
    assert json.loads((tmp_path / "dtd" / "sweep.json").read_text())["method"] == "vpt_deep"
    # The optimiser (and batch size, warm-up) are the method's release recipe.
    assert {c.optimizer for c, _ in trainer.calls} == {"sgd"}
    assert {c.batch_size for c, _ in trainer.calls} == {128}
    capsys.readouterr()


def test_val_runs_cover_the_grid_with_batch_scaled_lrs(tmp_path):
    _, trainer = run(tmp_path, base_config_fn=standin_config, overrides={"batch_size": 64})
    val = trainer.runs("val")
    assert sorted((c.lr, c.wd) for c in val) == sorted(
        (lr / 2, wd) for lr in SCALED_LRS for wd in WDS)
    assert {c.seed for c in val} == {0}
    assert {c.task for c, _ in trainer.calls} == {"dtd"}
    assert all(Path(w).parent == tmp_path / "dtd" / c.split
               for c, w in trainer.calls)


def test_selection_picks_best_val_top1(tmp_path):
    results, _ = run(tmp_path)
    assert (results[0].lr, results[0].wd) == (0.125, 0.001)
    assert results[0].val_top1 == pytest.approx(0.9)
    selection = json.loads((tmp_path / "dtd" / "selection.json").read_text())
    assert (selection["lr"], selection["wd"]) == (0.125, 0.001)
    assert len(selection["grid"]) == 20


def test_ties_go_to_smaller_lr_then_smaller_wd(tmp_path):
    # Best 0.8 at lr 0.5 and at lr 0.05 (two wds each); everything else worse.
    def val_top1(task, lr, wd):
        return 0.8 if lr in (0.5, 0.05) and wd in (0.01, 0.001) else 0.3

    results, _ = run(tmp_path, trainer=FakeTrainer(val_top1=val_top1))
    assert (results[0].lr, results[0].wd) == (0.05, 0.001)

    # Direct: float noise below 1e-6 is a tie, a real difference (one val image) is not.
    assert sweep_lib.select_hparams({(0.5, 0.0): 0.7, (0.25, 0.0): 0.7 - 1e-9}) == (0.25, 0.0)
    assert sweep_lib.select_hparams({(0.5, 0.0): 0.705, (0.25, 0.0): 0.7}) == (0.5, 0.0)
    # Diverged (None) and NaN points are never selected.
    assert sweep_lib.select_hparams({(0.5, 0.0): None, (0.25, 0.0): float("nan"),
                                    (0.1, 0.0): 0.1}) == (0.1, 0.0)
    with pytest.raises(ValueError, match="diverged"):
        sweep_lib.select_hparams({(0.5, 0.0): None})


def test_test_runs_use_selection_and_seeds(tmp_path):
    results, trainer = run(tmp_path, num_seeds=4)
    test = trainer.runs("test")
    assert [c.seed for c in test] == [0, 1, 2, 3]
    assert {(c.lr, c.wd) for c in test} == {(0.125, 0.001)}
    plain = [default_test_top1("dtd", 0.125, 0.001, s) for s in range(4)]
    # dtd compresses under the release: its compressed model's number is the reported one.
    expected = [p - COMPRESSION_DROP for p in plain]
    assert results[0].metric == sweep_lib.COMPRESSED_TOP1
    assert results[0].test_top1 == pytest.approx(expected)
    assert results[0].plain_top1 == pytest.approx(plain)
    assert results[0].mean == pytest.approx(statistics.mean(expected))
    assert results[0].std == pytest.approx(statistics.stdev(expected))
    assert [Path(w).name for c, w in trainer.calls if c.split == "test"] == [
        f"seed={s}" for s in range(4)]


@pytest.mark.parametrize("with_config", [True, False], ids=["results_config", "older_results"])
def test_second_call_runs_nothing(tmp_path, with_config):
    first, trainer = run(tmp_path, tasks=("dtd", "eurosat"),
                         trainer=FakeTrainer(with_config=with_config))
    assert len(trainer.calls) == 2 * (20 + 3)
    results = json.loads(next(tmp_path.glob("dtd/val/*/results.json")).read_text())
    assert ("config" in results) == with_config
    second, trainer = run(tmp_path, tasks=("dtd", "eurosat"))
    assert trainer.calls == []
    assert second == first


def test_partial_sweep_runs_only_missing(tmp_path):
    # Interrupted after 7 completed runs: 13 val runs and all test runs are missing.
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, trainer=FakeTrainer(fail_after=7))
    done = {p.parent for p in tmp_path.glob("dtd/*/*/results.json")}
    assert len(done) == 7
    results, trainer = run(tmp_path)
    rerun = {Path(w) for _, w in trainer.calls}
    assert len(trainer.calls) == 13 + 3
    assert not rerun & done
    # The selection still sees all 20 val results, including the 7 read from disk.
    assert (results[0].lr, results[0].wd) == (0.125, 0.001)


def test_diverged_val_run_is_excluded_and_not_retried(tmp_path):
    def val_top1(task, lr, wd):
        if lr == 0.5:
            raise FloatingPointError("loss is nan")
        return default_val_top1(task, lr, wd)

    results, trainer = run(tmp_path, trainer=FakeTrainer(val_top1=val_top1))
    assert (results[0].lr, results[0].wd) == (0.125, 0.001)
    assert len(list(tmp_path.glob(f"dtd/val/*/{sweep_lib.FAILED_MARKER}"))) == 4
    lines = []
    _, trainer = run(tmp_path, trainer=FakeTrainer(val_top1=val_top1), log=lines.append)
    assert trainer.calls == []
    assert lines[0].endswith(": 23 runs, 23 finished earlier, 0 to train")
    assert "run 1 of 23: dtd lr=0.5 wd=0.01 seed=0 (val): diverged earlier " \
        f"({sweep_lib.FAILED_MARKER}), not retried" in lines


def test_reports_group_means(tmp_path):
    tasks = ("clevr_count", "eurosat", "dtd", "cifar100")  # deliberately not in table order
    results, _ = run(tmp_path, tasks=tasks, num_seeds=2)
    assert [r.task for r in results] == list(TASK_GROUPS)  # table order

    def task_mean(task, drop=COMPRESSION_DROP):  # every task here compresses (T=1)
        return 100 * statistics.mean(default_test_top1(task, 0.125, 0.001, s) - drop
                                     for s in (0, 1))

    natural = (task_mean("cifar100") + task_mean("dtd")) / 2
    overall = statistics.mean(task_mean(t) for t in tasks)
    of_groups = (natural + task_mean("eurosat") + task_mean("clevr_count")) / 3
    rows = {r["name"]: r for r in csv.DictReader(io.StringIO(
        (tmp_path / "results.csv").read_text()))}
    assert float(rows["natural"]["test_top1_mean_pct"]) == pytest.approx(natural)
    assert float(rows["specialized"]["test_top1_mean_pct"]) == pytest.approx(task_mean("eurosat"))
    assert float(rows["structured"]["test_top1_mean_pct"]) == pytest.approx(
        task_mean("clevr_count"))
    assert float(rows["mean_over_tasks"]["test_top1_mean_pct"]) == pytest.approx(overall)
    assert float(rows["mean_of_group_means"]["test_top1_mean_pct"]) == pytest.approx(of_groups)
    assert rows["natural"]["num_tasks"] == "2" and rows["mean_over_tasks"]["num_tasks"] == "4"
    assert rows["mean_of_group_means"]["num_groups"] == "3"
    assert float(rows["dtd"]["lr"]) == 0.125 and float(rows["dtd"]["wd"]) == 0.001
    # The reported number is named, and the trained model's kept in its own column.
    assert rows["dtd"]["reported"] == "compression.top1"
    assert float(rows["dtd"]["plain_test_top1_mean_pct"]) == pytest.approx(
        task_mean("dtd", drop=0))

    md = (tmp_path / "results.md").read_text()
    lines = md.splitlines()
    assert lines[0] == "## VTAB-1k sweep: vqt"
    assert lines[2].startswith("Protocol and preprocessing of every run: protocol ")
    assert lines[4].startswith("Test top-1: the compressed model's (the compression stage")
    assert lines[6].startswith("| task |")
    dtd_std = 100 * statistics.stdev(default_test_top1("dtd", 0.125, 0.001, s) for s in (0, 1))
    assert (f"| dtd | natural | 0.125 | 0.001 | 90.00 | {task_mean('dtd'):.2f} ± {dtd_std:.2f} "
            f"| compressed model | {task_mean('dtd', drop=0):.2f} | 2 |") in md
    assert f"| **Natural** (2 tasks) | | | | | **{natural:.2f}** | | | |" in lines
    assert f"| **Specialized** (1 task) | | | | | **{task_mean('eurosat'):.2f}** | | | |" in lines
    assert f"| **Mean of group means** (3 groups) | | | | | **{of_groups:.2f}** | | | |" in lines
    assert f"| **Mean over tasks** (4 tasks) | | | | | **{overall:.2f}** | | | |" in lines


def test_compression_runs_on_the_final_runs_only_and_is_reported(tmp_path):
    # The release compresses its final (train800val200 -> test) runs of the T=1 tasks only,
    # and reports the compressed model's test top-1 for them.
    groups = {**TASK_GROUPS, "svhn": "natural"}
    results, trainer = run(tmp_path, tasks=("dtd", "svhn"), num_seeds=2, task_groups=groups)
    assert len(trainer.runs("val")) == 40
    assert not any(c.compression.enabled for c in trainer.runs("val"))
    assert [(c.task, c.compression.enabled) for c in trainer.runs("test")] == [
        ("dtd", True), ("dtd", True), ("svhn", False), ("svhn", False)]
    dtd, svhn = results
    assert (dtd.metric, svhn.metric) == ("compression.top1", "top1")
    assert svhn.plain_top1 == () and len(dtd.plain_top1) == 2
    rows = {r["name"]: r for r in csv.DictReader(io.StringIO(
        (tmp_path / "results.csv").read_text()))}
    assert (rows["svhn"]["reported"], rows["svhn"]["plain_test_top1_mean_pct"]) == ("top1", "")
    assert float(rows["dtd"]["test_top1_mean_pct"]) == pytest.approx(100 * dtd.mean)
    md = (tmp_path / "results.md").read_text()
    assert "Test top-1: the compressed model's (the compression stage after training) for dtd," \
        in md
    # A results.json without a 'reported' entry (written before runs recorded it): the number
    # follows from the config it recorded.
    path = sweep_lib.test_run_dir(tmp_path, "dtd", 0) / "results.json"
    recorded = json.loads(path.read_text())
    del recorded["reported"]
    assert sweep_lib.reported_of_run(recorded) == {
        "metric": "compression.top1", "top1": recorded["compression"]["top1"]}


def _hand_results() -> list:
    """Three natural tasks, one specialized, two structured: unequal groups."""
    return [
        sweep_lib.TaskResult("cifar100", "natural", 0.1, 0.0, 0.6, (0.59, 0.61)),  # 0.60
        sweep_lib.TaskResult("dtd", "natural", 0.1, 0.0, 0.7, (0.70,)),
        sweep_lib.TaskResult("flowers102", "natural", 0.1, 0.0, 0.8, (0.80,)),
        sweep_lib.TaskResult("eurosat", "specialized", 0.1, 0.0, 0.9, (0.90,)),
        sweep_lib.TaskResult("clevr_count", "structured", 0.1, 0.0, 0.4, (0.40,)),
        sweep_lib.TaskResult("kitti", "structured", 0.1, 0.0, 0.5, (0.50,)),
    ]


def test_the_two_averages_differ_when_groups_differ_in_size():
    # Groups: natural (0.60 + 0.70 + 0.80) / 3 = 0.70, specialized 0.90, structured 0.45.
    # Mean of group means: (0.70 + 0.90 + 0.45) / 3 = 0.68333...
    # Mean over tasks: (0.60 + 0.70 + 0.80 + 0.90 + 0.40 + 0.50) / 6 = 0.65
    results = _hand_results()
    rows = {r.name: r for r in sweep_lib.summarize(results)}
    assert [r.name for r in sweep_lib.summarize(results)] == [
        "natural", "specialized", "structured", "mean_of_group_means", "mean_over_tasks"]
    assert rows["natural"].mean == pytest.approx(0.70)
    assert rows["structured"].mean == pytest.approx(0.45)
    assert rows["mean_of_group_means"].mean == pytest.approx(2.05 / 3)
    assert (rows["mean_of_group_means"].num_groups, rows["mean_of_group_means"].num_tasks) == (
        3, 6)
    assert rows["mean_over_tasks"].mean == pytest.approx(0.65)

    lines = sweep_lib.to_markdown(results).splitlines()
    assert "| **Natural** (3 tasks) | | | | | **70.00** | | | |" in lines
    assert "| **Mean of group means** (3 groups) | | | | | **68.33** | | | |" in lines
    assert "| **Mean over tasks** (6 tasks) | | | | | **65.00** | | | |" in lines
    table = [line for line in lines if line.startswith("|")]
    assert table[-2:] == ["| **Mean of group means** (3 groups) | | | | | **68.33** | | | |",
                          "| **Mean over tasks** (6 tasks) | | | | | **65.00** | | | |"]

    csv_rows = list(csv.DictReader(io.StringIO(sweep_lib.to_csv(results))))
    assert [(r["name"], r["kind"]) for r in csv_rows[-2:]] == [
        ("mean_of_group_means", "all"), ("mean_over_tasks", "all")]
    assert float(csv_rows[-2]["test_top1_mean_pct"]) == pytest.approx(68.3333333)
    assert float(csv_rows[-1]["test_top1_mean_pct"]) == pytest.approx(65.0)
    assert csv_rows[-2]["num_groups"] == "3" and csv_rows[-1]["num_tasks"] == "6"


def test_mean_of_group_means_says_when_groups_are_missing():
    results = [r for r in _hand_results() if r.group != "specialized"]
    lines = sweep_lib.to_markdown(results).splitlines()
    assert "| **Mean of group means** (2 of 3 groups) | | | | | **57.50** | | | |" in lines
    # An image folder is no VTAB group: only the mean over tasks.
    folder = [sweep_lib.TaskResult("folder", "custom", 0.1, 0.0, 0.5, (0.5,))]
    assert [r.name for r in sweep_lib.summarize(folder)] == ["mean_over_tasks"]
    assert "Mean of group means" not in sweep_lib.to_markdown(folder)
    assert sweep_lib.to_markdown(folder, method="vqt").startswith("## Sweep: vqt\n")


def release_config(task: str) -> ml_collections.ConfigDict:
    """The stand-in config with the release protocol's preprocessing fields."""
    c = standin_config(task)
    c.protocol, c.normalization, c.resize, c.batching = "release", "imagenet", "float", "epoch"
    return c


def big_vision_config(task: str) -> ml_collections.ConfigDict:
    c = standin_config(task)
    c.protocol, c.normalization, c.resize, c.batching = "big_vision", "inception", "uint8", "stream"
    return c


def test_header_names_the_protocol_and_preprocessing_of_the_runs(tmp_path):
    results, _ = run(tmp_path, tasks=("dtd", "eurosat"), num_seeds=1,
                     base_config_fn=release_config)
    described = protocol.describe(workdir_lib.as_dict(release_config("dtd")))
    assert {r.protocols for r in results} == {(described,)}
    md = (tmp_path / "results.md").read_text()
    assert f"Protocol and preprocessing of every run: {described}." in md.splitlines()
    # describe() names the protocol and the preprocessing: resize and normalisation.
    assert "protocol release" in described and "ImageNet mean/std" in described
    assert "float" in described
    rows = list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
    assert [r["protocol"] for r in rows if r["kind"] == "task"] == [described, described]

    # Without a recorded config (older results.json, no config.json) the header says so.
    results, _ = run(tmp_path / "older", num_seeds=1, trainer=FakeTrainer(with_config=False))
    assert results[0].protocols == (sweep_lib.NOT_RECORDED,)
    assert (f"Protocol and preprocessing of every run: {sweep_lib.NOT_RECORDED}."
            in (tmp_path / "older" / "results.md").read_text())


def test_header_says_when_runs_disagree_on_protocol(tmp_path):
    release = protocol.describe(workdir_lib.as_dict(release_config("dtd")))
    big_vision = protocol.describe(workdir_lib.as_dict(big_vision_config("dtd")))
    assert release != big_vision

    def mixed(task):  # one task with each protocol
        return release_config(task) if task == "dtd" else big_vision_config(task)

    run(tmp_path / "tasks", tasks=("dtd", "eurosat"), num_seeds=1, base_config_fn=mixed)
    md = (tmp_path / "tasks" / "results.md").read_text()
    assert "**The runs disagree on protocol or preprocessing**" in md
    assert f"* {release} (dtd)" in md.splitlines()
    assert f"* {big_vision} (eurosat)" in md.splitlines()
    assert "of every run" not in md

    # Within one task: a reused run trained under another protocol (its sweep settings match,
    # so it is read, not retrained) is named too.
    run(tmp_path / "runs", num_seeds=2, base_config_fn=release_config)
    path = sweep_lib.test_run_dir(tmp_path / "runs", "dtd", 1) / "results.json"
    results = json.loads(path.read_text())
    results["config"] = workdir_lib.as_dict(big_vision_config("dtd")) | {
        k: results["config"][k] for k in ("split", "lr", "wd", "seed")}
    path.write_text(json.dumps(results))
    (results_again,), trainer = run(tmp_path / "runs", num_seeds=2,
                                    base_config_fn=release_config)
    assert trainer.calls == []
    assert results_again.protocols == tuple(sorted((release, big_vision)))
    lines = (tmp_path / "runs" / "results.md").read_text().splitlines()
    assert f"* {release} (dtd)" in lines and f"* {big_vision} (dtd)" in lines


def test_tables_need_no_tensorflow():
    # A results table can be rebuilt (e.g. in a notebook) without the training stack.
    code = ("import sys, vqt_jax.protocol_tables; "
            "sys.exit(any(m.split('.')[0] in ('tensorflow', 'jax') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0


def test_script_keeps_the_protocols_names():
    # experiments/plot.py's tests and notebooks load the script for these.
    assert cli.TaskResult is sweep_lib.TaskResult
    assert cli.write_reports is sweep_lib.write_reports
    assert sweep_lib.TaskResult is protocol_tables.TaskResult  # one class, re-exported
    with pytest.raises(AttributeError):
        cli.no_such_name  # noqa: B018


def test_group_rows_only_for_groups_present(tmp_path):
    run(tmp_path, tasks=("dtd",), num_seeds=1)
    md = (tmp_path / "results.md").read_text()
    assert "**Natural** (1 task)" in md
    assert "Specialized" not in md and "Structured" not in md


def test_unknown_task_fails_fast(tmp_path):
    trainer = FakeTrainer()
    with pytest.raises(ValueError, match=r"nope.*Valid tasks: cifar100, dtd, eurosat"):
        sweep_lib.run_sweep(["dtd", "nope"], tmp_path, base_config_fn=standin_config,
                           train_fn=trainer, task_groups=TASK_GROUPS)
    assert trainer.calls == []
    assert not any(tmp_path.iterdir())


def test_real_task_table_has_groups():
    groups = sweep_lib.vtab_task_groups()
    assert len(groups) == 20 and list(groups)[-1] == "folder"  # the 19, then an image folder
    assert list(groups)[:3] == ["caltech101", "cifar100", "dtd"]
    assert {g: list(groups.values()).count(g) for g in sweep_lib.GROUPS} == {
        "natural": 7, "specialized": 4, "structured": 8}
    with pytest.raises(ValueError, match="Valid tasks: caltech101"):
        sweep_lib.check_tasks(["dtd", "imagenet"], groups)


def test_parse_overrides():
    assert sweep_lib.parse_overrides(["epochs=10", "model.num_queries=20", "data_dir=/tmp/tfds",
                                  "model.kv_dtype=bfloat16", "x=None", "y=1e-3", "z=a=b"]) == {
        "epochs": 10, "model.num_queries": 20, "data_dir": "/tmp/tfds",
        "model.kv_dtype": "bfloat16", "x": None, "y": 0.001, "z": "a=b"}
    for bad in ["epochs", "=3", "lr=0.1", "seed=1", "split=val"]:
        with pytest.raises(ValueError):
            sweep_lib.parse_overrides([bad])


def test_apply_overrides_copies_nested_fields():
    config = standin_config("dtd")
    out = resolve.apply_overrides(config, {"model.num_queries": 10, "data_dir": "/tmp/tfds"})
    assert (out.model.num_queries, out.data_dir) == (10, "/tmp/tfds")
    assert (config.model.num_queries, config.data_dir) == (1, None)


def test_set_overrides_reach_config_from_command_line(tmp_path, capsys):
    trainer = FakeTrainer()
    cli.main([f"--workdir={tmp_path}", "--tasks=dtd,eurosat", "--seeds=2",
              "--set", "epochs=10", "model.num_queries=10", "--set=batch_size=64"],
             base_config_fn=base_config_fn(), train_fn=trainer, task_groups=TASK_GROUPS)
    assert len(trainer.calls) == 2 * (20 + 2)
    assert all(c.epochs == 10 and c.model.num_queries == 10 and c.batch_size == 64
               for c, _ in trainer.calls)
    assert max(c.lr for c in trainer.runs("val")) == 0.25  # 1.0 x 64 / 256
    assert {c.method for c, _ in trainer.calls} == {"vqt"}
    out = capsys.readouterr().out
    assert out == (tmp_path / "results.md").read_text()
    assert "| **Mean over tasks** (2 tasks) |" in out


def test_bad_override_fails_before_training(tmp_path):
    trainer = FakeTrainer()
    for overrides, error in [({"model.nope": 1}, KeyError), ({"nope.x": 1}, KeyError),
                             ({"epochs": "ten"}, TypeError), ({"lr": 0.1}, ValueError)]:
        with pytest.raises(error):
            run(tmp_path, tasks=("dtd", "eurosat"), trainer=trainer, overrides=overrides)
    assert trainer.calls == []


def test_changed_overrides_are_refused(tmp_path):
    run(tmp_path, overrides={"epochs": 10})
    with pytest.raises(ValueError, match="another --workdir"):
        run(tmp_path)
    _, trainer = run(tmp_path, overrides={"epochs": 10})  # same settings: all reused
    assert trainer.calls == []
    # Where the data lives does not change results: a moved data_dir is not refused.
    _, trainer = run(tmp_path, overrides={"epochs": 10, "data_dir": "/elsewhere"})
    assert trainer.calls == []


@pytest.mark.skipif(not REAL_CONFIG.is_file(), reason="configs/vtab.py not written yet")
def test_real_config_accepts_overrides():
    config = sweep_lib.load_config_fn(REAL_CONFIG)("dtd")
    assert config.batch_size is None and config.method == "vqt"  # the method's, when run
    assert resolve.resolve(config).batch_size == 128
    out = resolve.apply_overrides(config, {"epochs": 10, "model.num_queries": 10})
    assert (out.epochs, out.model.num_queries) == (10, 10)
    assert (config.epochs, config.model.num_queries) == (100, 1)  # the original is untouched


def test_no_run_of_a_sweep_puts_its_cache_in_the_workdir(tmp_path):
    # The default cache directory (caching.default_cache_dir) is on each host's own disk and
    # named by contents, so the runs of a task share one cache without a cache_dir of their
    # own (tests/test_cache_location.py tests the location itself).
    _, trainer = run(tmp_path, tasks=("dtd", "eurosat"), num_seeds=2)
    assert trainer.calls and all(not c.cache_dir for c, _ in trainer.calls)


def test_an_image_folder_is_swept_like_a_task_but_not_part_of_all(tmp_path, capsys):
    groups = sweep_lib.vtab_task_groups()
    assert len(groups) == 20 and groups["folder"] == "custom"
    trainer = FakeTrainer()
    cli.main([f"--workdir={tmp_path / 'all'}", "--tasks=all", "--seeds=1"],
             base_config_fn=base_config_fn(), train_fn=trainer,
             task_groups={"dtd": "natural", "folder": "custom"})
    assert {c.task for c, _ in trainer.calls} == {"dtd"}
    trainer = FakeTrainer()
    cli.main([f"--workdir={tmp_path / 'folder'}", "--tasks=folder", "--seeds=1"],
             base_config_fn=base_config_fn(), train_fn=trainer,
             task_groups={"dtd": "natural", "folder": "custom"})
    assert {c.task for c, _ in trainer.calls} == {"folder"}
    capsys.readouterr()


def _ends(lines: list[str]) -> list[str]:
    return [line for line in lines if re.match(r"run \d+ of \d+ took ", line)]


def test_progress_numbers_the_runs_and_gives_an_eta(tmp_path):
    clock = FakeClock()
    lines: list[str] = []
    run(tmp_path, trainer=FakeTrainer(clock=clock), num_seeds=2, log=lines.append, clock=clock)
    assert lines[0] == "Sweep of 1 task (vqt, 2 seeds): 22 runs, 0 finished earlier, 22 to train"
    begins = [line for line in lines if re.match(r"run \d+ of 22: ", line)]
    assert [int(line.split()[1]) for line in begins] == list(range(1, 23))
    assert begins[0] == "run 1 of 22: dtd lr=0.5 wd=0.01 seed=0 (val)"
    assert begins[19] == "run 20 of 22: dtd lr=0.025 wd=0.0 seed=0 (val)"
    assert begins[20] == "run 21 of 22: dtd lr=0.125 wd=0.001 seed=0 (test)"
    assert begins[21] == "run 22 of 22: dtd lr=0.125 wd=0.001 seed=1 (test)"
    ends = _ends(lines)
    assert len(ends) == 22
    # Each line follows its run's; 10 s per run, so the ETA is 10 s per run left.
    assert lines[1:3] == [begins[0], ends[0]]
    assert ends[0] == ("run 1 of 22 took 10s; 10s elapsed, 10s per trained run (1 so far); "
                       "ETA 3m30s for 21 runs left to train")
    assert ends[20] == ("run 21 of 22 took 10s; 3m30s elapsed, 10s per trained run "
                        "(21 so far); ETA 10s for 1 run left to train")
    assert ends[21].endswith("; no runs left to train")
    assert "dtd: selected lr=0.125 wd=0.001 (val top-1 0.9000)" in lines


def test_resumed_runs_count_as_done_but_not_towards_the_rate(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, trainer=FakeTrainer(fail_after=7), log=lambda line: None)
    clock = FakeClock()
    lines: list[str] = []
    run(tmp_path, trainer=FakeTrainer(clock=clock), log=lines.append, clock=clock)
    assert lines[0].endswith(": 23 runs, 7 finished earlier, 16 to train")
    assert lines[1] == ("run 1 of 23: dtd lr=0.5 wd=0.01 seed=0 (val): finished earlier, its "
                        "results.json is read")
    ends = _ends(lines)
    assert len(ends) == 16
    # The 7 runs read from disk took no time: counted in, the rate would be 8 runs per 10 s
    # and the ETA 19s instead of the 15 remaining runs' 2m30s.
    assert ends[0] == ("run 8 of 23 took 10s; 10s elapsed, 10s per trained run (1 so far); "
                       "ETA 2m30s for 15 runs left to train")


def test_progress_goes_to_the_log_by_default(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO)
    cli.main([f"--workdir={tmp_path}", "--tasks=dtd", "--seeds=1"],
             base_config_fn=base_config_fn(), train_fn=FakeTrainer(), task_groups=TASK_GROUPS)
    messages = [r.getMessage() for r in caplog.records]
    assert "run 1 of 21: dtd lr=0.5 wd=0.01 seed=0 (val)" in messages
    assert len(_ends(messages)) == 21 and "ETA " in _ends(messages)[0]
    capsys.readouterr()


def test_reused_results_must_be_of_their_run_as_recorded(tmp_path):
    run(tmp_path, num_seeds=1)
    path = sweep_lib.val_run_dir(tmp_path, "dtd", 0.25, 0.0) / "results.json"
    results = json.loads(path.read_text())
    assert results["config"]["lr"] == results["lr"] == 0.25
    refused = re.escape(f"{path} records lr=0.125, but the sweep runs lr=0.25 there") + \
        ".*" + re.escape(f"Delete {path.parent} to retrain it")

    # The recorded config is what counts, the top-level keys only without it.
    results["lr"] = 0.125
    path.write_text(json.dumps(results))
    _, trainer = run(tmp_path, num_seeds=1)
    assert trainer.calls == []
    results["lr"], results["config"]["lr"] = 0.25, 0.125  # e.g. resumed by hand at a lower lr
    path.write_text(json.dumps(results))
    with pytest.raises(ValueError, match=refused):
        run(tmp_path, num_seeds=1)

    # An older results.json (no "config") is checked by its top-level keys.
    del results["config"]
    path.write_text(json.dumps(results))
    _, trainer = run(tmp_path, num_seeds=1)
    assert trainer.calls == []
    results["lr"] = 0.125
    path.write_text(json.dumps(results))
    with pytest.raises(ValueError, match=refused):
        run(tmp_path, num_seeds=1)
    # One with neither (only the top-1) is read as before.
    path.write_text(json.dumps({"top1": results["top1"]}))
    _, trainer = run(tmp_path, num_seeds=1)
    assert trainer.calls == []
