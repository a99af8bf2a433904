"""Progress lines (rate, ETA) for the long phases, and library logs kept at warning level."""

from __future__ import annotations

import logging
import os
import re

import pytest
from absl import logging as absl_logging

from tests import train_utils
from vqt_jax import cli, progress
from vqt_jax.data import pipeline
from vqt_jax.training import engine, evaluation, feature_heads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_have_rate_and_eta():
    clock, lines = FakeClock(), []
    p = progress.Progress("Evaluating on test", 1000, "images", every_s=10, log=lines.append,
                          clock=clock)
    for _ in range(4):
        clock.now += 5
        p.update(100)
    assert lines == ["Evaluating on test: 200/1000 images (20%), 20.0 images/s, ETA 40s",
                     "Evaluating on test: 400/1000 images (40%), 20.0 images/s, ETA 30s"]
    clock.now += 30
    p.update(600)
    assert p.done() == 50
    assert lines[-1] == "Evaluating on test: 1000 images in 50.0 s (20.0 images/s)"


def test_the_eta_waits_for_the_steady_rate_and_the_end_for_done():
    """The first update (compilation included) gives no ETA and no rate for the ETAs after it;
    the count reaching the total logs nothing: `done()` says when the work is over."""
    clock, lines = FakeClock(), []
    p = progress.Progress("Training", 1000, "steps", every_s=10, log=lines.append, clock=clock)
    clock.now = 60  # the first chunk: 10 s of compiling per step
    p.update(100)
    assert lines == ["Training: 100/1000 steps (10%), 1.7 steps/s"]
    for _ in range(9):
        clock.now += 5
        p.update(100)
    assert lines[1:] == ["Training: 300/1000 steps (30%), 20.0 steps/s, ETA 35s",
                         "Training: 500/1000 steps (50%), 20.0 steps/s, ETA 25s",
                         "Training: 700/1000 steps (70%), 20.0 steps/s, ETA 15s",
                         "Training: 900/1000 steps (90%), 20.0 steps/s, ETA 5s"]
    clock.now += 30  # the work after the last step
    p.done()
    assert lines[5:] == ["Training: 1000 steps in 135.0 s (7.4 steps/s)"]


def test_a_short_phase_stays_quiet():
    clock, lines = FakeClock(), []
    p = progress.Progress("Quick", 10, log=lines.append, clock=clock)
    clock.now = 0.5
    p.update(10)
    p.done()
    assert lines == []


def test_slow_units_and_long_etas_read_well():
    clock, lines = FakeClock(), []
    p = progress.Progress("Sweep", 22, "runs", every_s=1, log=lines.append, clock=clock)
    clock.now = 300
    p.update()
    clock.now = 600
    p.update()
    assert lines == ["Sweep: 1/22 runs (5%), 300.0 s per run",
                     "Sweep: 2/22 runs (9%), 300.0 s per run, ETA 1h40m"]
    assert progress.format_duration(125) == "2m05s"


def test_native_logs_are_off_unless_asked_for(monkeypatch):
    """XLA's C++ lines (absl's InitializeLog notice with them) stay off by default; the user's
    own level and --log_libraries win."""
    for argv, preset, level in ((["main.py", "--config=c.py"], None, "2"),
                                (["main.py", "--log_libraries"], None, None),
                                (["predict.py", "--log_libraries=false"], None, "2"),
                                (["main.py"], "0", "0")):
        if preset is None:
            monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
        else:
            monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", preset)
        cli.quiet_native_logs(argv)
        assert os.environ.get("TF_CPP_MIN_LOG_LEVEL") == level, argv


def _record(path: str, level: int) -> logging.LogRecord:
    return logging.LogRecord("absl", level, path, 1, "msg", None, None)


def test_library_info_lines_are_dropped_warnings_kept():
    f = cli._QuietLibraries()
    orbax = "/site-packages/orbax/checkpoint/_src/checkpoint_manager.py"
    assert not f.filter(_record(orbax, logging.INFO))
    assert f.filter(_record(orbax, logging.WARNING))
    assert not f.filter(_record("/site-packages/jax/_src/xla_bridge.py", logging.INFO))
    assert f.filter(_record("/work/vqt_jax/training/train.py", logging.INFO))


def test_a_run_reports_its_phases_and_no_orbax_info(tmp_path, caplog, monkeypatch, capsys):
    """Through main.py's entry: progress of reading the training images, training, evaluation
    and the feature heads, each with an ETA (at least three updates: the first gives none);
    orbax quiet; the hyperparameters in short lines."""
    monkeypatch.chdir(REPO)
    # Every update logs, so a tiny run shows what a long one shows every few seconds.
    def every_update(*args, **kwargs):
        return progress.Progress(*args, **{**kwargs, "every_s": 0})

    for module in (evaluation, engine, feature_heads, pipeline):
        monkeypatch.setattr(module, "Progress", every_update)
    folder = train_utils.make_image_folder(tmp_path / "data",
                                           counts=(("train", 8), ("val", 4), ("test", 10)))
    caplog.set_level(logging.INFO)
    code = cli.run(["main.py", f"--config=tests/tiny_config.py:{folder}",
                    f"--workdir={tmp_path / 'wd'}", "--config.epochs=1",
                    "--config.checkpoint_every_steps=1", "--config.baselines=('linear',)"])
    assert code == 0, capsys.readouterr().err
    messages = [r.getMessage() for r in caplog.records]
    assert any(re.match(r"Reading the training images: \d+/36 images \(\d+%\), .*ETA", m)
               for m in messages), messages
    assert any(re.match(r"Training: \d+/5 steps \(\d+%\), .*(steps/s|s per step), ETA", m)
               for m in messages), messages
    assert any(re.match(r"Evaluating on test: \d+/30 images \(\d+%\), .*ETA", m)
               for m in messages), messages
    assert any(re.match(r"Evaluation features: \d+/30 images .*ETA", m)
               for m in messages), messages
    assert any(re.match(r"Feature heads: fitting linear: \d+/14 fits \(\d+%\), .*ETA", m)
               for m in messages), messages
    assert not any(re.search(r"\(100%\)", m) for m in messages), messages
    (hparams,) = [m for m in messages if m.startswith("Hyperparameters:")]
    assert len(hparams.splitlines()) > 5 and max(map(len, hparams.splitlines())) <= 200
    assert any(re.match(r"Feature heads: linear fitted in \d+s, top-1 ", m)
               for m in messages), messages
    orbax = [r for r in caplog.records if "/orbax/" in r.pathname and r.levelno < logging.WARNING]
    assert orbax == []


@pytest.fixture(autouse=True)
def _remove_quiet_filter():
    """cli.run installs the filter on the absl logger: take it off again after each test."""
    yield

    logger = absl_logging.get_absl_logger()
    for f in list(logger.filters):
        if isinstance(f, cli._QuietLibraries):
            logger.removeFilter(f)


def test_evaluation_counts_a_batch_once_the_devices_have_computed_it(tmp_path):
    """JAX dispatches asynchronously: the evaluation's progress (and its final 'N images in
    X s') must wait for each batch's results, not only for it to be queued. Each batch's step
    here is a chain of matmuls that takes a while on a CPU."""
    import jax
    import jax.numpy as jnp

    from vqt_jax.training.mesh import make_mesh

    folder = train_utils.make_image_folder(tmp_path / "data")
    config = train_utils.tiny_config(data_dir=folder)
    config.eval_batch_size = 8
    mesh = make_mesh(1)

    @jax.jit
    def step(batch):
        m = jnp.full((512, 512), batch["image"].mean() / 512)
        return {"total": jax.lax.fori_loop(0, 200, lambda _, x: jnp.tanh(x @ m), m).sum()}

    jax.block_until_ready(step({"image": jnp.zeros((8, 32, 32, 3))}))  # compiled
    outs, ready_when_counted = [], []
    p = progress.Progress("Evaluating on test", 15, "images", every_s=0, log=lambda _: None)
    update = p.update

    def counted(n):
        ready_when_counted.append(outs[len(ready_when_counted)]["total"].is_ready())
        update(n)

    p.update = counted
    host = evaluation.run_eval_batches(lambda b: outs.append(step(b)) or outs[-1], config, mesh, p)
    assert len(host) == 2 and p.count == 15  # 15 images in batches of 8
    assert ready_when_counted == [True, True]
