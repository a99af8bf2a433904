"""One program per protocol stage (vqt_jax/training/stacked.py) against the runs one by one.

The same tiny task is swept twice, once with every run trained on its own (the trainer of
`main.py`) and once with each stage's runs as one program: every run's train loss, eval loss
and top-1, the selection and the test numbers must agree. The grid holds a point that diverges
(lr 1e38), so exclusion is compared too, and a killed stage must resume to the same numbers.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import absl_verbosity, multihost, train_utils
from vqt_jax import export, resolve
from vqt_jax import sweep as sweep_lib
from vqt_jax.training import checkpointing, compression_stage, stacked
from vqt_jax.training.train import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]
GRID = sweep_lib.Grid(base_lrs=(1e38, 0.02), wds=(0.01, 0.0), reference_batch_size=8)
NUM_SEEDS = 2
# One xdist worker runs the whole module (pyproject: --dist=loadgroup): its tests build on
# the `sweeps` fixture (two sweeps per method, mostly compilation) and rerun its programs,
# which that worker has then compiled already.
pytestmark = pytest.mark.xdist_group("stacked")
KEYS = ("task", "split", "method", "seed", "lr", "wd", "steps", "num_eval_examples",
        "num_trainable", "cached")


def base_config(data_dir: str, method: str):
    c = train_utils.tiny_config(data_dir=data_dir, batching="epoch", epochs=2, warmup_epochs=1)
    c.task, c.method = "folder", method
    if method == "vqt":  # feature heads after training, fitted on the program's features
        c.baselines = ("linear",)
        c.compression.enabled = True
        c.compression.keep_frac = 0.5
        c.compression.epochs = 3
    c = resolve.resolve(c)
    c.batch_size = 8  # the grid's reference batch: lrs as written
    return c


def sweep(base, workdir: Path, program: bool) -> tuple[sweep_lib.TaskResult, list[str]]:
    """The protocol on the tiny task: each stage as one program, or every run on its own.

    Each sweep builds a cache of its own (in `workdir`), as a first sweep of the task would:
    the default directory is shared by contents, and what a stage does depends on whether
    it builds the cache or finds it."""
    if not base.cache_dir:
        base = copy.deepcopy(base)
        base.cache_dir = str(workdir / "cache")
    lines: list[str] = []
    stage_fn = sweep_lib.program_stage_fn(strict=True, log=lines.append) if program else None
    dirs = sweep_lib.task_run_dirs(workdir, "folder", GRID, base.batch_size, NUM_SEEDS)
    progress = sweep_lib.SweepProgress(dirs, log=lines.append)
    result = sweep_lib.sweep_task("folder", "custom", base, workdir, grid=GRID,
                                 num_seeds=NUM_SEEDS, train_fn=train_and_evaluate,
                                 progress=progress, stage_fn=stage_fn)
    return result, lines


class CompileLog(logging.Handler):
    """Collects jax's 'Finished XLA compilation of jit(NAME)' lines, and the evaluations'
    progress lines ('Evaluating ...', from absl)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.evaluations: list[str] = []

    def emit(self, record):
        text = record.getMessage()
        if text.startswith("Finished XLA compilation of jit("):
            self.names.append(text.split("jit(", 1)[1].split(")", 1)[0])
        elif text.startswith("Evaluating "):
            self.evaluations.append(text)


@pytest.fixture(scope="module", params=["vqt", "linear"])
def sweeps(request, tmp_path_factory):
    """(root, method, {mode: (TaskResult, log lines, compiled jit names)})."""
    import jax

    root = tmp_path_factory.mktemp(f"stacked_{request.param}")
    data = train_utils.make_image_folder(root / "data")
    base = base_config(data, request.param)
    out = {}
    for mode in ("sequential", "one"):
        handler = CompileLog()
        loggers = [logging.getLogger(name) for name in ("jax", "absl")]
        for logger in loggers:
            logger.addHandler(handler)
        compressed: list[tuple[str, int]] = []  # (split, seed) of every compression stage run
        real_compress = compression_stage.train

        def counted(configs, *args, _log=compressed, _real=real_compress, **kwargs):
            _log.extend((c.split, c.seed) for c in configs)
            return _real(configs, *args, **kwargs)

        try:
            # A module-scoped fixture runs before conftest's function-scoped `_absl_info`.
            with (absl_verbosity.info(), jax.log_compiles(True),
                  pytest.MonkeyPatch.context() as patch):
                patch.setattr(compression_stage, "train", counted)
                result, lines = sweep(base, root / mode, mode == "one")
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
        out[mode] = (result, lines, handler.names, handler.evaluations, compressed)
    return root, request.param, out


def run_dirs(root: Path, mode: str) -> list[Path]:
    return sweep_lib.task_run_dirs(root / mode, "folder", GRID, 8, NUM_SEEDS)


def paired_results(dirs: list[Path], reference: list[Path]):
    """(dir, its results.json, the reference's) for each pair of run directories whose
    reference finished; a reference that diverged must have diverged in `dirs` too."""
    for mine, ref in zip(dirs, reference, strict=True):
        if (ref / sweep_lib.FAILED_MARKER).is_file():
            assert (mine / sweep_lib.FAILED_MARKER).is_file(), mine
            assert not (mine / "results.json").exists(), mine
            continue
        yield mine, *(json.loads((d / "results.json").read_text()) for d in (mine, ref))


def test_every_run_equals_its_sequential_run(sweeps):
    root, _, _ = sweeps

    def seq_dir(one_dir: Path) -> Path:
        return root / "sequential" / one_dir.relative_to(root / "one")
    compared = 0
    for one_dir, b, a in paired_results(run_dirs(root, "one"), run_dirs(root, "sequential")):
        assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}, one_dir
        for k in ("train_loss", "eval_loss"):
            assert math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-6), (one_dir, k, a[k], b[k])
        assert a["top1"] == b["top1"], one_dir
        assert a.get("baselines") == b.get("baselines"), one_dir
        assert a.get("compression") == b.get("compression"), one_dir
        assert ("compression" in b) == (b["method"] == "vqt" and b["split"] == "test"), one_dir
        assert b["program"]["runs"] in (len(GRID.points(8)), NUM_SEEDS)
        # Each run records its own whole config (the sweeps' workdirs, and so caches, differ).
        same = {k: v for k, v in a["config"].items() if k != "cache_dir"}
        assert {k: b["config"][k] for k in same} == same
        assert json.loads((one_dir / "config.json").read_text()) == b["config"]
        assert (one_dir / "metrics.jsonl").read_text().count("train/loss") >= 1
        # The same evaluation report and the same exported part.
        reports = [json.loads((d / "evaluation.json").read_text())
                   for d in (one_dir, seq_dir(one_dir))]
        assert reports[0]["confusion"] == reports[1]["confusion"], one_dir
        exports = [export.read(str(d / export.EXPORT_FILE)) for d in (one_dir, seq_dir(one_dir))]
        assert sorted(exports[0].arrays) == sorted(exports[1].arrays)
        for k, v in exports[0].arrays.items():
            np.testing.assert_allclose(v, exports[1].arrays[k], rtol=1e-4, atol=1e-6)
        compared += 1
    failed = [d for d in run_dirs(root, "sequential") if (d / sweep_lib.FAILED_MARKER).is_file()]
    assert compared == 2 + NUM_SEEDS and len(failed) == 2  # lr 1e38 diverges at both wds


def test_compression_runs_on_the_test_runs_only(sweeps):
    # Both stages of compression train after the final (test) runs only, as in the release;
    # none after the 4 grid points on val. Counted as the stages ran, in both modes.
    root, method, out = sweeps
    expected = [("test", s) for s in range(NUM_SEEDS)] if method == "vqt" else []
    for mode in ("sequential", "one"):
        assert sorted(out[mode][4]) == expected, mode
        for d in run_dirs(root, mode):
            path = d / "results.json"
            if path.is_file():
                results = json.loads(path.read_text())
                assert ("compression" in results) == (
                    method == "vqt" and results["split"] == "test"), d
                if "compression" in results:  # the reported number is the compressed one
                    assert results["reported"] == {"metric": "compression.top1",
                                                   "top1": results["compression"]["top1"]}


def test_selection_and_test_numbers_are_identical(sweeps):
    root, _, out = sweeps
    assert out["one"][0] == out["sequential"][0]
    selections = [json.loads((root / m / "folder" / "selection.json").read_text())
                  for m in ("sequential", "one")]
    assert selections[0] == selections[1]
    # Not a trivial task: the grid points differ on val, and each seed trained its own run.
    assert len({p["val_top1"] for p in selections[0]["grid"]}) > 1
    losses = [json.loads((d / "results.json").read_text())["eval_loss"]
              for d in run_dirs(root, "one")[-NUM_SEEDS:]]
    assert len(set(losses)) == NUM_SEEDS


def test_each_stage_is_one_program_compiled_once(sweeps):
    _, _, out = sweeps
    lines = out["one"][1]
    assert f"folder: the grid on val: {len(GRID.points(8))} runs as one program" in lines
    assert f"folder: the seeds on test: {NUM_SEEDS} runs as one program" in lines
    assert any(line.startswith("run 1 of 6: folder") and "trained in the program above" in line
               for line in lines)
    # One training loop and one evaluation per stage, against one per run one by one; the
    # compression stages (on the final runs, where the protocol compresses) are two more
    # loops of the engine: per stage, or per run one by one.
    one, seq = out["one"][2], out["sequential"][2]
    compressing = 2 if out["one"][4] else 0
    assert one.count("chunk") == 2 + compressing, one
    assert one.count("fn") == 2, one
    assert seq.count("chunk") == (len(GRID.points(8)) + NUM_SEEDS
                                  + compressing * len(out["sequential"][4]))
    # The grid's stage built the train+val cache, and evaluated on val from the float32
    # outputs it kept of val's rows; the seeds' stage runs the backbone over test.
    assert out["one"][3][0] == (
        f"Evaluating {len(GRID.points(8))} runs on val: the backbone's float32 outputs kept by "
        "the cache build, no backbone pass."), out["one"][3]
    assert f"Evaluating {NUM_SEEDS} runs on test: one backbone pass." in out["one"][3]


@pytest.mark.parametrize("sweeps", ["vqt"], indirect=True)
def test_a_killed_stage_resumes_to_the_same_numbers(sweeps, tmp_path, monkeypatch):
    root, method, _ = sweeps
    base = base_config(str(root / "data"), method)
    save = checkpointing.save

    def save_then_die(manager, step, state):
        save(manager, step, state)
        if step == 4:
            raise KeyboardInterrupt("killed after the checkpoint of step 4")

    monkeypatch.setattr(checkpointing, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        sweep(base, tmp_path, True)
    monkeypatch.setattr(checkpointing, "save", save)
    assert not any((d / "results.json").exists() for d in run_dirs(tmp_path.parent, tmp_path.name))
    _, lines = sweep(base, tmp_path, True)
    assert ("4 runs of folder (val) as one program: 6 steps each, 1 example order(s), "
            "resuming from step 4") in lines
    for resumed, a, b in paired_results(run_dirs(tmp_path.parent, tmp_path.name),
                                        run_dirs(root, "one")):
        assert (a["train_loss"], a["top1"]) == (b["train_loss"], b["top1"]), resumed
        # The resumed stage reopens the cache, which holds no float32 val rows: its evaluation
        # runs the backbone, the uninterrupted one read the rows its cache build kept (the
        # same values, another program: equal to float rounding, as with the runs one by one).
        assert math.isclose(a["eval_loss"], b["eval_loss"], rel_tol=1e-5, abs_tol=1e-6), resumed


def tiny_configs(method: str = "vqt", n: int = 2, **fields):
    base = train_utils.tiny_config(data_dir="/nonexistent", **fields)
    base.method = method
    out = []
    for i in range(n):
        c = base.copy_and_resolve_references()
        c.lr = 0.1 * (i + 1)
        out.append(c)
    return out


def test_why_not_names_what_keeps_runs_apart():
    assert stacked.why_not(tiny_configs()) is None
    assert "adapts the backbone" in stacked.why_not(tiny_configs("vpt_deep"))
    assert "adapts the backbone" in stacked.why_not(tiny_configs("lora"))
    assert "config.cache='off'" in stacked.why_not(tiny_configs(cache="off"))
    assert "cache_on_device='off'" in stacked.why_not(tiny_configs(cache_on_device="off"))
    seeds = tiny_configs(init="")
    seeds[1].lr, seeds[1].seed = seeds[0].lr, 1
    assert "random initialisation" in stacked.why_not(seeds)
    seeds[1].seed = 0
    assert stacked.why_not(seeds) is None  # the grid: one seed, one random backbone
    seeds[1].seed = 1
    for c in seeds:
        c.prepare = "fashion_mnist_dinov2"  # sets init (the demo): known once it has run
    assert stacked.why_not(seeds) is None
    other = tiny_configs()
    other[1].epochs = 9
    with pytest.raises(ValueError, match="differ only in .*also differ in \\['epochs'\\]"):
        stacked.why_not(other)


def test_program_one_refuses_and_auto_falls_back(tmp_path):
    configs = tiny_configs("vpt_deep")
    dirs = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(ValueError, match="program='one' but .*adapts the backbone"):
        sweep_lib.program_stage_fn(strict=True)(configs, dirs, True)
    lines: list[str] = []
    assert sweep_lib.program_stage_fn(log=lines.append)(configs, dirs, True) is None
    assert lines == ["Training these runs one by one: method 'vpt_deep' adapts the backbone, so "
                     "every run needs its own backbone passes"]
    assert not any(d.exists() for d in dirs)


def test_persistent_compilation_cache_serves_a_rerun(tmp_path):
    """A run with config.compilation_cache_dir fills that directory; a run of the same shapes
    in a new process (and workdir) loads its programs from there instead of compiling."""
    data = train_utils.make_image_folder(tmp_path / "data")
    cache = tmp_path / "xla"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    code = (
        "import sys, jax.monitoring as m\n"
        "events = []\n"
        "m.register_event_listener(lambda name, **kw: events.append(name))\n"
        "from vqt_jax import cli\n"
        "assert cli.run(sys.argv[1:]) == 0\n"
        "print('HITS', events.count('/jax/compilation_cache/cache_hits'),"
        " events.count('/jax/compilation_cache/compile_requests_use_cache'))\n")

    def run(workdir: str) -> tuple[int, int, set[str]]:
        out = subprocess.run(
            [sys.executable, "-c", code, "main.py", f"--config=tests/tiny_config.py:{data}",
             f"--workdir={tmp_path / workdir}", f"--config.compilation_cache_dir={cache}"],
            cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
        hits, requests = map(int, out.split("HITS")[1].split())
        return hits, requests, set(os.listdir(cache))

    hits, requests, first = run("a")
    assert hits == 0 and requests > 3 and len(first) > 3
    hits, requests, second = run("b")
    assert hits == requests and second == first


@pytest.mark.parametrize("sweeps", ["vqt"], indirect=True)
def test_a_stage_too_large_runs_as_several_programs(sweeps, tmp_path, monkeypatch):
    """config.program_max_runs=3 cuts the 4-point grid into 3 + 1; the first program is then
    found too large for the devices (`fits`, forced here) and halved: 1 + 2 + 1 programs, the
    same numbers as the runs one by one."""
    root, method, _ = sweeps
    base = base_config(str(root / "data"), method)
    base.program_max_runs = 3
    # What is compared is the training: the feature heads after it are left out.
    base.baselines, base.compression.enabled = (), False
    calls = []

    def fits(compiled, mesh):
        calls.append(compiled)
        return "too large (forced by the test)" if len(calls) == 1 else None

    monkeypatch.setattr(stacked, "fits", fits)
    _, lines = sweep(base, tmp_path, True)
    assert "3 runs as one program: too large (forced by the test); splitting them in two" in lines
    programs = [line for line in lines if " runs of folder (" in line]
    assert [p.split(" runs")[0] for p in programs] == ["1", "2", "1", "2"], programs
    for _, a, b in paired_results(run_dirs(tmp_path.parent, tmp_path.name),
                                  run_dirs(root, "sequential")):
        assert a["top1"] == b["top1"]
        assert math.isclose(a["eval_loss"], b["eval_loss"], rel_tol=1e-5, abs_tol=1e-6)


@pytest.mark.parametrize("sweeps", ["vqt"], indirect=True)
def test_seeds_can_share_one_example_order(sweeps, tmp_path):
    """config.order_seed=0: every seed keeps its own init and dropout but reads seed 0's
    batches, so its program gathers each batch once for all of them. The runs one by one with
    the same setting give the same numbers; only seed 0's run is the one of its own order."""
    root, method, _ = sweeps
    base = base_config(str(root / "data"), method)
    base.order_seed = 0
    results, lines = {}, {}
    for mode in ("sequential", "one"):  # the grid is done: the fixture's runs one by one
        shutil.copytree(root / "sequential" / "folder" / "val", tmp_path / mode / "folder" / "val")
        results[mode], lines[mode] = sweep(base, tmp_path / mode, mode == "one")
    assert results["one"] == results["sequential"]
    programs = [line for line in lines["one"] if " runs of folder (" in line]
    assert len(programs) == 1 and programs[0].startswith(f"{NUM_SEEDS} runs"), programs
    assert "1 example order(s)" in programs[0]
    seeds = slice(-NUM_SEEDS, None)
    shared = list(paired_results(run_dirs(tmp_path, "one")[seeds],
                                 run_dirs(tmp_path, "sequential")[seeds]))
    for one_dir, b, a in shared:
        assert b["config"]["order_seed"] == 0 and a["top1"] == b["top1"], one_dir
        for k in ("train_loss", "eval_loss"):
            assert math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-6), (one_dir, k, a[k], b[k])
    own = [r for _, r, _ in paired_results(run_dirs(root, "sequential")[seeds],
                                           run_dirs(root, "sequential")[seeds])]
    assert shared[0][1]["train_loss"] == pytest.approx(own[0]["train_loss"], rel=1e-5)
    assert shared[1][1]["train_loss"] != pytest.approx(own[1]["train_loss"], rel=1e-3)
    assert shared[1][1]["eval_loss"] != pytest.approx(shared[0][1]["eval_loss"], rel=1e-3)


def _two_host_worker(process_id: int, port: int, root: str, data: str, mode: str) -> None:
    """One host of `experiments/vtab_sweep.py --distributed --program=one` on the tiny task
    (the test's grid) with a gs:// workdir (the fake bucket under ROOT/gcs) and its own local
    cache directory. mode 'first': stopped right after the test stage's checkpoint of step
    KILL_STEP; 'resume': the same command again."""
    from tests.scripts import load_script  # noqa: PLC0415
    from tests.test_sweep_remote import remote  # noqa: PLC0415

    os.chdir(os.path.join(root, "cwd"))  # must stay empty: the test checks it
    sweep_lib.grid_for = lambda method: GRID  # the tests' 2 x 2 grid, not the release's 20
    kill_at = KILL_STEP if mode == "first" else None
    with remote(os.path.join(root, "gcs")), multihost.killed_after_checkpoint(kill_at, "/test/"):
        try:
            load_script("vtab_sweep").main(
                ["--distributed", f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={process_id}", "--tasks=folder", f"--workdir={BUCKET_SWEEP}",
                 f"--seeds={NUM_SEEDS}", "--program=one",
                 "--set", f"cache_dir={os.path.join(root, 'local', f'host{process_id}')}"],
                base_config_fn=lambda task: base_config(data, "vqt"),
                task_groups={"folder": sweep_lib.FOLDER_GROUP})
        except multihost.Killed:
            open(os.path.join(root, "local", f"killed{process_id}"), "w").close()


BUCKET_SWEEP = "gs://bucket/sweep"
# The test stage's program is stopped right after its checkpoint of this step is written.
KILL_STEP = 4


def _launch_two(root: Path, data: Path, mode: str) -> subprocess.CompletedProcess:
    return multihost.launch("test_stacked", str(root), str(data), mode, timeout=600)


@pytest.mark.parametrize("sweeps", ["vqt"], indirect=True)
def test_two_hosts_sweep_on_a_bucket_killed_and_resumed_like_one_host(sweeps, tmp_path):
    """`vtab_sweep.py --distributed --program=one` on 2 processes x 2 CPU devices with a
    gs:// workdir (a fake bucket). Both hosts are stopped right after the test stage's
    checkpoint of step KILL_STEP; the re-run reads the grid's results from the bucket on both
    hosts and resumes the test stage from that checkpoint. Every stage is one program over
    both hosts, the diverged grid points are marked, each host keeps its cache on its own
    disk, every file is in the bucket (none in the current directory), and the
    selection, the test numbers and every run's results are those of the one-process sweep
    (8 devices)."""
    root, _, out = sweeps
    (tmp_path / "cwd").mkdir()
    (tmp_path / "local").mkdir()
    first = _launch_two(tmp_path, root / "data", "first")
    assert first.returncode == 0, first.stdout[-5000:]
    assert sorted(os.listdir(tmp_path / "local"))[-2:] == ["killed0", "killed1"]
    two = tmp_path / "gcs" / "bucket" / "sweep"
    (stage,) = (two / "folder" / "test").glob(f"{stacked.STAGE_PREFIX}*")
    assert sorted(os.listdir(stage / "checkpoints")) == [str(KILL_STEP)]
    assert not list((two / "folder" / "test").glob("*/results.json"))
    grid = GRID.points(8)
    assert f"the grid on val: {len(grid)} runs as one program" in first.stdout

    resumed = _launch_two(tmp_path, root / "data", "resume")
    assert resumed.returncode == 0, resumed.stdout[-5000:]
    assert "the grid on val" not in resumed.stdout  # its results were read from the bucket
    diverged = sum(lr == 1e38 for lr, _ in grid)
    finished = len(grid) - diverged
    assert resumed.stdout.count("finished earlier, its results.json is read") == finished
    assert resumed.stdout.count(": diverged earlier (") == diverged
    assert f"the seeds on test: {NUM_SEEDS} runs as one program" in resumed.stdout
    assert f"resuming from step {KILL_STEP}" in resumed.stdout
    # Process 1 logs warnings only: the lines of the chief, once each.
    assert resumed.stdout.count("folder: selected lr=") == 1
    assert (two / "results.md").is_file() and resumed.stdout.count("| folder |") == 1
    assert (two / "results.csv").is_file()
    assert not os.listdir(tmp_path / "cwd")
    # The feature heads read every row, so each host built a whole copy in its own directory
    # (tests/test_device_rows.py covers the runs that keep only their devices' rows).
    for host in ("host0", "host1"):
        entries = os.listdir(tmp_path / "local" / host)
        assert entries and all(e.endswith(f"-{host}") for e in entries), entries

    assert (json.loads((two / "folder" / "selection.json").read_text())
            == json.loads((root / "one" / "folder" / "selection.json").read_text()))
    assert json.loads((two / "folder" / "sweep.json").read_text())["method"] == "vqt"
    dirs = sweep_lib.task_run_dirs(two, "folder", GRID, 8, NUM_SEEDS)
    for run_dir in dirs:  # diverged or not, a run directory says what ran
        for name in ("config.json", "metrics.jsonl"):
            assert (run_dir / name).is_file(), (run_dir, name)
    compared = 0
    for two_dir, b, a in paired_results(dirs, run_dirs(root, "one")):
        assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}, two_dir
        assert a["top1"] == b["top1"] and b["program"]["runs"] == a["program"]["runs"], two_dir
        for k in ("train_loss", "eval_loss"):
            assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), (two_dir, k, a[k], b[k])
        assert a["baselines"]["linear"]["top1"] == b["baselines"]["linear"]["top1"], two_dir
        for name in ("evaluation.json", export.EXPORT_FILE):
            assert (two_dir / name).is_file(), (two_dir, name)
        assert list(two_dir.glob("events.out.tfevents.*")), two_dir
        compared += 1
    assert compared == 2 + NUM_SEEDS
    assert out["one"][0].test_top1 == tuple(
        json.loads((d / "results.json").read_text())["reported"]["top1"]
        for d in dirs[-NUM_SEEDS:])
    assert list((two / "folder" / "val").glob(f"{stacked.STAGE_PREFIX}*/checkpoints/*"))
    # The export of a run in the bucket reads back (export.read, through the same fake).
    from tests.test_sweep_remote import remote  # noqa: PLC0415

    with remote(tmp_path / "gcs"):
        exported = export.read(f"{BUCKET_SWEEP}/folder/test/seed=0/{export.EXPORT_FILE}")
    assert exported.class_names == ["class0", "class1", "class2"]
    assert exported.meta["results"]["top1"] == json.loads(
        (dirs[-NUM_SEEDS] / "results.json").read_text())["top1"]


if __name__ == "__main__":  # one host of test_two_hosts_sweep_on_a_bucket_killed_and_resumed...
    port_arg, root_arg, data_arg, mode_arg = sys.argv[1:5]
    multihost.run_two(_two_host_worker, int(port_arg), root_arg, data_arg, mode_arg)
