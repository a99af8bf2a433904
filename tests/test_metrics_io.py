"""metrics_io: metrics.jsonl, TensorBoard event files that TensorBoard reads, the parameter table.

(Remote workdirs: tests/test_multihost_io.py; without TensorFlow: tests/test_tf_free.py.)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from vqt_jax.training import metrics_io


def test_chief_writes_jsonl_and_an_event_file_tensorboard_reads(tmp_path):
    writer = metrics_io.create_writer(tmp_path, is_chief=True)
    writer.write_hparams({"lr": 0.1, "data_dir": None, "baselines": ("linear", "knn"),
                          "model": {"num_queries": np.int64(2)}, "dtype": jnp.float32})
    writer.write_scalars(2, {"train/loss": np.float32(1.5), "train/lr": jnp.asarray(0.1)})
    writer.write_scalars(4, {"train/loss": 1.25})
    writer.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1:] == [{"step": 2, "train/loss": 1.5, "train/lr": np.float32(0.1).item()},
                        {"step": 4, "train/loss": 1.25}]
    assert rows[0]["hparams"]["lr"] == 0.1 and rows[0]["hparams"]["data_dir"] is None
    [events] = tmp_path.glob("events.out.tfevents.*")
    acc = event_accumulator.EventAccumulator(str(events))
    acc.Reload()
    loss = acc.Tensors("train/loss")
    assert [e.step for e in loss] == [2, 4]
    assert [e.tensor_proto.float_val[0] for e in loss] == [1.5, 1.25]
    assert acc.SummaryMetadata("train/loss").plugin_data.plugin_name == "scalars"
    [content] = acc.PluginTagToContent("hparams").values()
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["lr"].number_value == 0.1 and hparams["data_dir"].string_value == ""
    assert hparams["baselines.1"].string_value == "knn"
    assert hparams["model.num_queries"].number_value == 2
    assert "float32" in hparams["dtype"].string_value


def test_other_hosts_only_log(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    writer = metrics_io.create_writer(tmp_path, is_chief=False)
    writer.write_hparams({"lr": 0.1})
    writer.write_scalars(3, {"train/loss": 0.5})
    writer.close()
    assert not list(tmp_path.iterdir())
    assert "[3] train/loss=0.5" in caplog.text and "Hyperparameters:\n  lr=0.1" in caplog.text


def test_parameter_overview(caplog):
    caplog.set_level(logging.INFO)
    metrics_io.log_parameter_overview({"head": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
                                       "queries": jnp.zeros((2, 5), jnp.bfloat16)})
    assert "head/kernel | (3, 4) | 12" in caplog.text
    assert "queries     | (2, 5) | 10" in caplog.text
    assert "Total: 26 parameters, 84 bytes" in caplog.text


def test_without_tensorboard_the_chief_writes_jsonl_only(tmp_path):
    """A machine without tensorboard (a bare accelerator host) trains and logs: metrics.jsonl
    is written, no event file, one warning says why."""
    code = f"""
import sys
sys.modules["tensorboard"] = None  # importing it raises ImportError
from vqt_jax.training import metrics_io
w = metrics_io.create_writer({str(tmp_path)!r}, True)
w.write_hparams({{"lr": 0.1}})
w.write_scalars(1, {{"loss": 2.0}})
w.close()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tensorboard is not installed" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"hparams": {"lr": 0.1}}, {"step": 1, "loss": 2.0}]
