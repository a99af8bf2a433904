"""The training loop end to end: folder data, resume, determinism, devices, NaN, bad configs."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import train_utils
from vqt_jax import checkpoints, resolve
from vqt_jax import trainable as trainable_lib
from vqt_jax import workdir as workdir_lib
from vqt_jax.training import evaluation, train


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return train_utils.make_image_folder(tmp_path_factory.mktemp("folder"))


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_folder_end_to_end_trains_only_queries_and_head(folder, tmp_path):
    config = train_utils.tiny_config(data_dir=folder, epochs=10)
    results, variables = train.run(config, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert results["num_eval_examples"] == 15  # test/ holds 3 classes x 5, each counted once
    losses = _losses(tmp_path)
    assert losses[-1] < 0.5 * losses[0]
    assert results["top1"] > 0.5  # 3 classes: chance is 1/3
    _assert_backbone_is_pretrained(config, variables, num_classes=3)
    assert os.listdir(tmp_path / "checkpoints")
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path))


def _assert_backbone_is_pretrained(config, variables, num_classes):
    """Every frozen leaf is bit-identical to the pretrained checkpoint (or its fresh init)."""
    model = train.build_model(resolve.resolve(config), num_classes)
    fresh = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))  # eager: op by op
    pretrained = checkpoints.load(config.init, fresh)
    _, frozen_after = trainable_lib.partition(variables, trainable_lib.rule_for("vqt"))
    _, frozen_before = trainable_lib.partition(pretrained, trainable_lib.rule_for("vqt"))
    assert set(frozen_after) == set(frozen_before)
    for k in frozen_before:
        np.testing.assert_array_equal(np.asarray(frozen_before[k]), np.asarray(frozen_after[k]),
                                      err_msg=k)


class _Kill(Exception):
    pass


def test_init_computes_only_what_the_checkpoint_lacks_and_gives_the_whole_inits_values(folder):
    """init_variables draws only the leaves the checkpoint does not hold (queries, head): the
    same values as the model's whole init from the seed's key, the rest the checkpoint's."""
    plan = train.plan_run(train_utils.tiny_config(data_dir=folder), None)
    variables, rng = train.init_variables(plan, 3)
    init_rng, train_rng = jax.random.split(jax.random.key(3))
    whole = jax.jit(plan.model.init)(init_rng, jnp.zeros((1, 32, 32, 3)))
    fresh = 0
    for path, got in jax.tree_util.tree_leaves_with_path(variables):
        loaded = _at(plan.pretrained, path)
        want = _at(whole, path) if isinstance(loaded, jax.ShapeDtypeStruct) else loaded
        fresh += isinstance(loaded, jax.ShapeDtypeStruct)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))
    assert fresh >= 3  # the queries, the head's kernel and bias
    assert jax.random.key_data(rng).tolist() == jax.random.key_data(train_rng).tolist()


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_resume_after_kill_matches_uninterrupted_run(folder, tmp_path):
    config = train_utils.tiny_config(data_dir=folder)
    full, v_full = train.run(config, str(tmp_path / "full"))

    def kill_at_6(step, _):
        if step == 6:  # the last checkpoint is step 4: steps 5-6 are lost and redone
            raise _Kill()

    with pytest.raises(_Kill):
        train.run(config, str(tmp_path / "resumed"), callbacks=[kill_at_6])
    assert not (tmp_path / "resumed" / "results.json").exists()
    resumed, v_resumed = train.run(config, str(tmp_path / "resumed"))
    assert resumed == full
    for a, b in zip(jax.tree.leaves(v_full), jax.tree.leaves(v_resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # And the same seed from scratch once more gives identical results.
    again, _ = train.run(config, str(tmp_path / "again"))
    assert again == full


def test_one_device_equals_eight_devices(folder, tmp_path):
    eight, _ = train.run(train_utils.tiny_config(data_dir=folder, epochs=3), str(tmp_path / "8"))
    one, _ = train.run(train_utils.tiny_config(data_dir=folder, epochs=3, num_devices=1),
                       str(tmp_path / "1"))
    assert jax.device_count() == 8
    assert one["num_eval_examples"] == eight["num_eval_examples"] == 15
    np.testing.assert_allclose(one["eval_loss"], eight["eval_loss"], rtol=1e-4)
    np.testing.assert_allclose(one["train_loss"], eight["train_loss"], rtol=1e-4)
    assert one["top1"] == eight["top1"]


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(task="not_a_task"), ValueError, "not a VTAB-1k task.*dtd"),
        (dict(lr=-0.1), ValueError, "config.lr must be > 0"),
        (dict(batch_size=12), ValueError, "batch_size=12 is not divisible by the 8 devices"),
        (dict(split="train"), ValueError, "config.split='train'"),
        (dict(method="nope"), ValueError, "Unknown method 'nope'"),
        (dict(image_size=30), ValueError, "image_size=30 is not a multiple of the patch size"),
        (dict(init="/no/such/file.npz"), FileNotFoundError, "/no/such/file.npz"),
    ],
)
def test_bad_config_fails_before_compiling(folder, tmp_path, monkeypatch, overrides, error, match):
    def no_jit(*a, **k):
        raise AssertionError("compiled before validating the config")

    monkeypatch.setattr(train.jax, "jit", no_jit)
    config = train_utils.tiny_config(data_dir=folder, **overrides)
    with pytest.raises(error, match=match):
        train.run(config, str(tmp_path / "wd"))
    assert not (tmp_path / "wd" / "checkpoints").exists()


def test_folder_without_train_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(train.jax, "jit", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    config = train_utils.tiny_config(data_dir=str(tmp_path / "data"))
    with pytest.raises(ValueError, match="train"):
        train.run(config, str(tmp_path / "wd"))


def test_mocked_vtab_task_end_to_end(tmp_path):
    """A VTAB-1k task through TFDS (mocked: random images and labels) trains and evaluates."""
    import tensorflow_datasets as tfds

    from tests.test_data import _fake_prepare

    tfds_dir = str(tmp_path / "tfds")
    _fake_prepare(tfds_dir, "dtd:3.*.*", {"train": 1880, "validation": 1880, "test": 1880})
    config = train_utils.tiny_config("dtd", data_dir=tfds_dir, split="val", epochs=15, lr=0.1)
    with tfds.testing.mock_data(num_examples=16, data_dir=tfds_dir):
        results, variables = train.run(config, str(tmp_path / "wd"))
    _assert_backbone_is_pretrained(config, variables, num_classes=47)
    assert results["task"] == "dtd"
    assert results["num_eval_examples"] == 16
    losses = _losses(tmp_path / "wd")
    assert losses[-1] < losses[0]
    assert (tmp_path / "wd" / "results.json").exists()


def test_a_kill_during_evaluation_keeps_how_the_run_trained(folder, tmp_path, monkeypatch):
    """A re-run after a kill between training and results.json reports the finished
    training as it ran (its last loss from the checkpoint, from the device cache)."""
    config = train_utils.tiny_config(data_dir=folder, cache="on", cache_storage="memory")
    full, _ = train.run(config, str(tmp_path / "full"))
    evaluate = evaluation.evaluate

    def killed(*args, **kwargs):
        raise _Kill()

    monkeypatch.setattr(evaluation, "evaluate", killed)
    with pytest.raises(_Kill):
        train.run(config, str(tmp_path / "wd"))
    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    again, _ = train.run(config, str(tmp_path / "wd"))
    keys = ("train_loss", "cached", "cache_on_device", "top1", "steps")
    assert {k: again[k] for k in keys} == {k: full[k] for k in keys}
    assert again["cached"] and again["cache_on_device"]


@pytest.mark.parametrize("by_hand", ["edited", "deleted"])
def test_checkpoints_of_another_config_are_not_resumed(folder, tmp_path, by_hand):
    """config.json edited or deleted by hand: the checkpoints' own record of their config
    refuses the resume (it would continue them under another lr and say so for all steps)."""
    config = train_utils.tiny_config(data_dir=folder)

    def kill_at_6(step, _):
        if step == 6:
            raise _Kill()

    workdir = tmp_path / "wd"
    with pytest.raises(_Kill):
        train.run(config, str(workdir), callbacks=[kill_at_6])
    recorded = workdir / "config.json"
    if by_hand == "edited":
        recorded.write_text(json.dumps({**json.loads(recorded.read_text()), "lr": 0.02}))
    else:
        recorded.unlink()
    with pytest.raises(workdir_lib.WorkdirError,
                       match=r"checkpoints in .*wd/checkpoints were written under another "
                             r"config than .*wd/config.json"):
        train.run(train_utils.tiny_config(data_dir=folder, lr=0.02), str(workdir))
