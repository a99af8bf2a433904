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
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.125)(jnp.ones(7)).block_until_ready()
    assert (profile["training"], profile["compression"], profile["cache_build"]) == (2.5, 4.0, 0)
    assert profile["compile"] > 0


def test_the_matmul_rate_is_a_positive_rate():
    """matmul_gflop_s times real matmuls (here tiny ones) and gives a rate in GFLOP/s."""
    rate = sweep_speed.matmul_gflop_s(8, 32, 16, repeats=3, square=32)
    assert 0 < rate < 1e5
