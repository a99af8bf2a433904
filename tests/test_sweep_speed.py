"""experiments/sweep_speed.py's FLOP floor (the sweeps it times are tests/test_stacked.py's)."""

import pytest

from tests.scripts import load_script
from vqt_jax import cache as cache_lib
from vqt_jax import costs
from vqt_jax.training import train

sweep_speed = load_script("sweep_speed")


# 2 s: a floor of about 2 s; 1 ms: one under 0.05 s, which rounds to 0 (a ratio over the
# rounded floor would divide by zero: `--tiny`'s floor is that small).
@pytest.mark.parametrize("forward_s", [2.0, 1e-3])
def test_the_flop_floor_is_the_forward_pass_plus_every_runs_steps_at_its_rate(tmp_path,
                                                                              forward_s):
    config_fn, overrides = sweep_speed.tiny_config(2, str(tmp_path))
    # The tiny folder: 12 train, 6 val, 9 test images; batch 8, 2 epochs, the last batch of an
    # epoch partial: a grid run trains on train (2 steps an epoch), a seed on train+val (3).
    row = sweep_speed.with_floor({"forward_pass_s": forward_s, "images": 27, "sequential_s": 100.0,
                                  "one_s": 40.0, "matmul_gflop_s": 0.01}, config_fn, overrides)
    assert row["training_run_steps"] == 20 * 2 * 2 + 5 * 2 * 3
    plan = train.plan_run(sweep_speed.resolve_lib.resolve(config_fn("folder"), overrides),
                          None)
    variables = train.abstract_variables(plan.model, plan.config)
    per_image = costs.forward_flops(plan.model, variables, 16)
    per_step = costs.cached_step_flops(plan.model, variables,
                                       cache_lib.spec_for(plan.model, "kv", 1, 16), 8,
                                       method="vqt", optimizer="adam")
    floor = forward_s + 110 * per_step / (per_image * 27 / forward_s)
    assert row["flop_floor_s"] == pytest.approx(floor, abs=0.05)
    # Over the unrounded floor: rounding its ratio to 2 decimals is all that may differ.
    assert row["one_over_floor"] == pytest.approx(40.0 / floor, abs=0.006)
    assert "shared_over_floor" not in row
    # The matmul floor: the pass's and the training's arithmetic at the bare matmul rate.
    matmul_floor = (per_image * 27 + 110 * per_step) / 0.01e9
    assert row["matmul_floor_s"] == pytest.approx(matmul_floor, abs=0.05)
    assert row["max_ratio"] == pytest.approx(100.0 / matmul_floor, rel=0.01)
    assert "flops" not in row


@pytest.mark.parametrize("before_after", [(10.0, 8.0), (8.0, 10.0)])
def test_the_faster_of_the_forward_passes_before_and_after_the_protocols_counts(
        monkeypatch, tmp_path, before_after):
    """measure() times the forward pass before and after the protocols (the machine's speed
    drifts) and divides by the faster, whichever comes first; the processes are stand-ins."""
    import types  # noqa: PLC0415

    forwards = list(before_after)
    result = types.SimpleNamespace(lr=0.1, wd=0.0, val_top1=0.5, test_top1=(0.4,) * 5)

    def in_fresh_process(fn, *args):
        if fn is sweep_speed.timed_forward:
            return forwards.pop(0), 27
        if fn is sweep_speed.timed_matmuls:
            return 150.0
        return {"sequential": 40.0, "one": 8.0}[args[-1]], result, {"training": 1.0}

    monkeypatch.setattr(sweep_speed, "_in_fresh_process", in_fresh_process)
    monkeypatch.setattr(sweep_speed, "with_floor", lambda row, *a: row)
    row = sweep_speed.measure("tiny", 2, str(tmp_path), ("sequential", "one"))
    assert not forwards  # both passes were timed
    assert row["forward_pass_before_after_s"] == list(before_after)
    assert row["forward_pass_s"] == 8.0
    assert row["matmul_gflop_s"] == 150.0
    assert (row["sequential_forward_equivalents"], row["one_forward_equivalents"]) == (5.0, 1.0)
    assert row["one_profile"] == {"training": 1.0}


def test_the_profile_counts_phases_and_compilation(monkeypatch):
    """A protocol's profile: each phase's progress span by its name, and JAX's compile time."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from vqt_jax import progress  # noqa: PLC0415

    clock = iter([0.0, 2.5, 10.0, 14.0])  # each span: its start, then its end
    monkeypatch.setattr(progress.Progress, "done", progress.Progress.done)  # restored after
    profile = sweep_speed._profiling()
    for what in ("Training", "Compression (stage 1, group lasso)"):
        p = progress.Progress(what, 10, clock=lambda: next(clock), log=lambda _: None)
        p.done()
    # An evaluation on test that compiles: its time less the compilation, per image.
    p = progress.Progress("Evaluating 5 runs on test", 9, log=lambda _: None)
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.125)(jnp.ones(7)).block_until_ready()
    p.update(9)
    seconds = p.done()
    assert (profile["training"], profile["compression"], profile["cache_build"]) == (2.5, 4.0, 0)
    assert profile["compile"] > 0
    assert profile["evaluation"] == seconds and profile["test_images"] == 9
    assert profile["test_evaluation"] == pytest.approx(seconds - profile["compile"])
    assert profile["test_evaluation"] < seconds


def test_the_matmul_rate_is_a_positive_rate():
    """matmul_gflop_s times real matmuls (here tiny ones) and gives a rate in GFLOP/s."""
    rate = sweep_speed.matmul_gflop_s(8, 32, 16, repeats=3, square=32)
    assert 0 < rate < 1e5


@pytest.mark.parametrize("num_queries", [1, 20])
def test_the_gpu_setup_runs_the_releases_T_and_compression(tmp_path, num_queries):
    """Each T of the gpu setup runs as the release's tasks of that T: compression on T = 1
    only; the cache is bfloat16, the compute the dtype asked for."""
    config_fn, overrides = sweep_speed.gpu_config(2, str(tmp_path), num_queries=num_queries,
                                                  dtype="bfloat16", tiny=True)
    config = sweep_speed.resolve_lib.resolve(config_fn("folder"), overrides)
    assert config.model.num_queries == num_queries
    assert config.compression.enabled == (num_queries == 1)
    assert (config.cache_dtype, config.model.dtype) == ("bfloat16", "bfloat16")


def _task_row(t: int, seconds: float, ms_per_image: float) -> dict:
    return {"T": t, "seconds": seconds, "test_images": 1000,
            "test_evaluation_ms_per_image": ms_per_image}


def test_the_vtab_estimate_takes_each_tasks_T_and_scales_its_test_evaluation():
    from vqt_jax.data import tasks  # noqa: PLC0415

    assert set(tasks.TEST_SIZES) == set(tasks.TASKS) == set(tasks.RELEASE_SETTINGS)
    rows = [_task_row(1, 60.0, 1.0), _task_row(10, 100.0, 2.0), _task_row(20, 200.0, 3.0)]
    est = sweep_speed.estimate_vtab(rows)
    per_task = est["per_task_s"]  # in seconds, to 0.1 s
    assert per_task["dtd"] == pytest.approx(60.0 + (1880 - 1000) * 1e-3, abs=0.05)  # T = 1
    assert per_task["clevr_distance"] == pytest.approx(100.0 + 14000 * 2e-3)  # T = 10
    assert per_task["kitti_distance"] == pytest.approx(200.0 + (711 - 1000) * 3e-3,
                                                       abs=0.05)  # T = 20
    assert est["total_s"] == pytest.approx(sum(per_task.values()), abs=0.1) and len(per_task) == 19
    # The slowest T = 1 task is a dSprites one: 73728 test images.
    assert est["slowest_t1_task_s"] == pytest.approx(60.0 + 72728e-3, abs=0.05)
    assert est["meets"] == {"vtab_19": est["total_s"] < 2400, "t1_task": False}
    partial = sweep_speed.estimate_vtab(rows[:1])
    assert partial["not_measured_T"] == [10, 20] and "total_s" not in partial


def test_the_gpu_run_writes_its_figures_after_each_T_and_times_runs_one_by_one(monkeypatch,
                                                                                tmp_path):
    """`--setups gpu`: each T's protocol, then the runs one by one, each in a process of its
    own (stand-ins here), the JSON rewritten after each."""
    calls = []

    def in_fresh_process(fn, epochs, root, options, *args):
        calls.append((fn.__name__, options["num_queries"], options["tiny"], *args))
        if fn is sweep_speed.timed_one_by_one:
            return [30.0, 10.0, 12.0]
        return {**_task_row(options["num_queries"], 50.0, 1.0), "compression": True,
                "compile_s": 20.0, "selected": {"lr": 0.1, "wd": 0.0}, "device": "cpu"}

    monkeypatch.setattr(sweep_speed, "_in_fresh_process", in_fresh_process)
    written = []
    monkeypatch.setattr(sweep_speed.json, "dump", lambda out, f, **_: written.append(
        [r["T"] for r in out["tasks"]] + (["one_by_one"] if "one_by_one" in out else [])))
    path = str(tmp_path / "gpu.json")
    out = sweep_speed.main(["--setups", "gpu", "--tiny", "--ts", "1,20", "--one_by_one", "3",
                            "--json", path])[0]
    assert calls == [("timed_task", 1, True), ("timed_task", 20, True),
                     ("timed_one_by_one", 1, True, 3)]
    assert written == [[1], [1, 20], [1, 20, "one_by_one"]]
    assert out["epochs"] == 2 and out["estimate"]["not_measured_T"] == [10]
    # The first run also builds the cache; the other 24 at the mean of the later ones.
    assert out["one_by_one"] == {"T": 1, "run_s": [30.0, 10.0, 12.0], "runs": 25,
                                 "protocol_estimate_s": 30.0 + 24 * 11.0}
