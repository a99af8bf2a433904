"""The `release` protocol against the VQT release's own definitions (github andytu28/VQT)."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from configs import vtab
from vqt_jax import data, protocol, resolve
from vqt_jax import trainable as trainable_lib
from vqt_jax.data import tasks
from vqt_jax.models import create_model
from vqt_jax.training import optim, train, train_step


def _release_lr_lambda(step: int, warmup: int, total: int) -> float:
    # src/solver/lr_scheduler.py, WarmupCosineSchedule.lr_lambda (cycles = 0.5), transcribed
    # (its float(cycles) kept as a literal).
    if step < warmup:
        return float(step) / float(max(1.0, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def _release_run(n: int, batch: int, epochs: int, warmup: int, base_lr: float):
    """(lr, batch size) of every optimiser step of the release's loop.

    src/engine/trainer.py: `for epoch in range(total_epoch)`, one pass of a DataLoader with
    drop_last=False (src/data/loader.py, one GPU), `scheduler.step()` after each epoch; a
    LambdaLR starts at lr_lambda(0).
    """
    steps = []
    for epoch in range(epochs):
        lr = base_lr * _release_lr_lambda(epoch, warmup, epochs)
        sizes = [batch] * (n // batch) + ([n % batch] if n % batch else [])
        steps += [(lr, size) for size in sizes]
    return steps


@pytest.mark.parametrize("n", [800, 1000, 37, 128])
def test_schedule_and_batches_match_the_release(n):
    batch, epochs, warmup, base_lr = 128, 100, 10, 0.125
    expected = _release_run(n, batch, epochs, warmup, base_lr)
    schedule, total = optim.training_schedule(
        base_lr, num_examples=n, batch_size=batch, epochs=epochs, warmup_epochs=warmup,
        batching="epoch", per_epoch=True)
    assert total == len(expected)
    lrs = np.asarray(jax.vmap(schedule)(jnp.arange(total)))
    np.testing.assert_allclose(lrs, [lr for lr, _ in expected], rtol=1e-6, atol=0)
    # The batches the data pipeline gives for these steps: sizes, and each epoch a permutation.
    s = data.steps_per_epoch(n, batch, "epoch")
    for epoch in (0, 1, epochs - 1):
        seen = []
        for j in range(s):
            step = epoch * s + j
            idx, mask = data.train_indices(step, n, global_batch_size=batch, seed=0,
                                           batching="epoch")
            assert int(mask.sum()) == expected[step][1]
            seen += list(idx[mask > 0])
        assert sorted(seen) == list(range(n))


def test_n1000_last_step_lr_is_the_releases():
    # The off-by-one of reading 782 steps as 101 epochs: the last epoch must be epoch 99.
    schedule, total = optim.training_schedule(
        0.125, num_examples=1000, batch_size=128, epochs=100, warmup_epochs=10)
    assert total == 800
    assert float(schedule(total - 1)) == pytest.approx(0.125 * _release_lr_lambda(99, 10, 100))
    # The same with full batches across epochs ('stream'): 782 steps, still 100 epochs.
    schedule, total = optim.training_schedule(
        0.125, num_examples=1000, batch_size=128, epochs=100, warmup_epochs=10,
        batching="stream")
    assert total == 782
    assert float(schedule(total - 1)) == pytest.approx(0.125 * _release_lr_lambda(99, 10, 100))


def test_per_task_table_is_the_releases():
    # run_demo_exp.sh: T=10 for smallnorb elevation and clevr distance; T=20 for svhn, dmlab,
    # dSprites location, smallnorb azimuth, KITTI distance; T=1 (with compression 0.7) elsewhere.
    t10 = {"smallnorb_elevation", "clevr_distance"}
    t20 = {"svhn", "dmlab", "dsprites_location", "smallnorb_azimuth", "kitti_distance"}
    assert set(tasks.RELEASE_SETTINGS) == set(tasks.TASKS)
    for name, setting in tasks.RELEASE_SETTINGS.items():
        t = 10 if name in t10 else 20 if name in t20 else 1
        assert setting.num_queries == t, name
        assert setting.compression == (t == 1), name


def test_vtab_config_resolves_the_task_settings():
    svhn = vtab.get_config("svhn")
    assert svhn.protocol == "release"
    assert (svhn.model.num_queries, svhn.compression.enabled) == (20, False)
    dtd = vtab.get_config("dtd")
    assert (dtd.model.num_queries, dtd.compression.enabled) == (1, True)
    assert dtd.compression.keep_frac == 0.7
    # The model a run builds from them: svhn's queries are [12, 20, 768].
    model = train.build_model(resolve.resolve(svhn), num_classes=10)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert shapes["queries"]["tokens"].shape == (12, 20, 768)
    # big_vision keeps T = 1 without compression, and today's conventions.
    bv = vtab.get_config("svhn,big_vision")
    assert (bv.model.num_queries, bv.compression.enabled) == (1, False)
    assert (bv.batching, bv.normalization, bv.resize, bv.model.head_init) == (
        "stream", "inception", "uint8", "zeros")
    with pytest.raises(ValueError, match="Unknown protocol 'nope'"):
        vtab.get_config("dtd,nope")


def _field(config, path: str):
    node = config
    for key in path.split("."):
        node = node[key]
    return node


@pytest.mark.parametrize("name", list(protocol.PROTOCOLS))
def test_the_config_sets_every_value_the_protocol_decides(name):
    # configs/vtab.py writes each value from `protocol.settings` once, for every task; a field
    # of the table the config forgot would keep a default of its own.
    for task in [*tasks.TASKS, "folder"]:
        config = vtab.get_config(f"{task},{name}")
        expected = protocol.settings(name, task)
        assert {path: _field(config, path) for path in expected} == expected, task
    source = Path(vtab.__file__).read_text()
    for path in protocol.settings(name, "dtd"):
        # Set from the table, not written twice (once as a default, once by the protocol).
        assert source.count(f'p["{path}"]') == 1, path


def test_head_init_is_kaiming_normal_fan_out_with_the_prior_bias():
    # src/models/mlp.py: kaiming_normal_(weight, a=0, mode='fan_out') on a [C, F] weight, i.e.
    # N(0, 2 / C), untruncated; bias -log((1 - 0.01) / 0.01).
    config = vtab.get_config("dtd")
    model = create_model(None, num_classes=47, patch_size=(8, 8), width=512, depth=1,
                         mlp_dim=64, num_heads=4, num_queries=1,
                         head_init=config.model.head_init,
                         head_bias_init=config.model.head_bias_init)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    kernel = np.asarray(variables["params"]["head"]["kernel"])
    assert kernel.shape == (1024, 47)
    std = math.sqrt(2.0 / 47)
    assert abs(kernel.mean()) < 4 * std / math.sqrt(kernel.size)
    assert kernel.std() == pytest.approx(std, rel=0.02)
    # Untruncated: a truncated normal at 2 std would have no values beyond 2 std and a smaller
    # std; a normal has about 4.6% there.
    assert np.mean(np.abs(kernel) > 2 * std) == pytest.approx(0.0455, abs=0.006)
    np.testing.assert_allclose(variables["params"]["head"]["bias"], -math.log(99), rtol=1e-6)


def test_release_preprocessing_is_tf_image_resize_in_float_then_imagenet():
    # src/data/datasets/tf_dataset.py: tf.image.resize(image, [224, 224]) (bilinear, float),
    # / 255, then (x - mean) / std with ImageNet's mean and std.
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), np.uint8)
    reference = tf.image.resize(image, [224, 224]).numpy() / 255.0
    reference = (reference - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    config = vtab.get_config("dtd")
    ours = data.normalize(data.resize(image, 224, protocol.round_resized(config)),
                          config.normalization)
    np.testing.assert_allclose(ours, reference, atol=2e-6)
    # The big_vision protocol rounds to uint8 (not the release's numbers).
    bv = vtab.get_config("dtd,big_vision")
    rounded = data.resize(image, 224, protocol.round_resized(bv))
    assert rounded.dtype == np.uint8


def test_mae_fc_norm_starts_fresh_under_the_release():
    config = vtab.get_config("dtd")
    config.model.fc_norm = True
    assert "Transformer/encoder_norm/.*" in train.dont_load(config)
    config.fc_norm_init = "checkpoint"
    assert "Transformer/encoder_norm/.*" not in train.dont_load(config)
    # A CLS model (the supervised ViT) loads its final norm either way.
    config = vtab.get_config("dtd")
    assert "Transformer/encoder_norm/.*" not in train.dont_load(config)


def test_describe_names_protocol_and_preprocessing():
    line = protocol.describe(vtab.get_config("dtd").to_dict())
    assert "protocol release" in line and "ImageNet mean/std" in line and "float" in line


def test_partial_batch_padding_does_not_enter_the_loss():
    # The release's short last batch: the mean over its real examples only.
    config = vtab.get_config("dtd")
    model = create_model(None, num_classes=5, patch_size=(8, 8), width=32, depth=1,
                         mlp_dim=64, num_heads=2, num_queries=1, query_dropout=0.0,
                         head_init=config.model.head_init,
                         head_bias_init=config.model.head_bias_init)
    images = jax.random.normal(jax.random.key(1), (6, 16, 16, 3))
    variables = jax.jit(model.init)(jax.random.key(0), images[:1])
    trainable, frozen = trainable_lib.partition(variables, trainable_lib.rule_for("vqt"))
    loss_fn = jax.jit(train_step.make_loss_fn(model))  # eager dispatch is op by op: slower

    def loss(batch):
        return float(loss_fn(trainable, frozen, batch, jax.random.key(2))[0])

    labels = jnp.array([0, 1, 2, 3, 4, 0])
    real = loss({"image": images[:4], "label": labels[:4]})
    padded = loss({"image": images, "label": labels,
                   "mask": jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])})
    assert padded == pytest.approx(real, rel=1e-6)
    assert loss({"image": images, "label": labels}) != pytest.approx(real, rel=1e-3)


# run_demo_exp.sh, transcribed: (script, data name, T) per line, in its order. A
# run_vqt_vtab_sparsity.sh line (keep frac 0.7) follows the run_vqt_vtab.sh line of every task
# it compresses.
_RUN_DEMO_EXP = [
    ("run_vqt_vtab", "vtab-caltech101", 1), ("run_vqt_vtab_sparsity", "vtab-caltech101", 1),
    ("run_vqt_vtab", "vtab-dtd", 1), ("run_vqt_vtab_sparsity", "vtab-dtd", 1),
    ("run_vqt_vtab", "vtab-oxford_flowers102", 1),
    ("run_vqt_vtab_sparsity", "vtab-oxford_flowers102", 1),
    ("run_vqt_vtab", "vtab-oxford_iiit_pet", 1),
    ("run_vqt_vtab_sparsity", "vtab-oxford_iiit_pet", 1),
    ("run_vqt_vtab", "vtab-cifar(num_classes=100)", 1),
    ("run_vqt_vtab_sparsity", "vtab-cifar(num_classes=100)", 1),
    ("run_vqt_vtab", "vtab-patch_camelyon", 1),
    ("run_vqt_vtab_sparsity", "vtab-patch_camelyon", 1),
    ("run_vqt_vtab", "vtab-resisc45", 1), ("run_vqt_vtab_sparsity", "vtab-resisc45", 1),
    ("run_vqt_vtab", 'vtab-diabetic_retinopathy(config="btgraham-300")', 1),
    ("run_vqt_vtab_sparsity", 'vtab-diabetic_retinopathy(config="btgraham-300")', 1),
    ("run_vqt_vtab", "vtab-eurosat", 1), ("run_vqt_vtab_sparsity", "vtab-eurosat", 1),
    ("run_vqt_vtab", 'vtab-clevr(task="count_all")', 1),
    ("run_vqt_vtab_sparsity", 'vtab-clevr(task="count_all")', 1),
    ("run_vqt_vtab", 'vtab-dsprites(predicted_attribute="label_orientation",num_classes=16)', 1),
    ("run_vqt_vtab_sparsity",
     'vtab-dsprites(predicted_attribute="label_orientation",num_classes=16)', 1),
    ("run_vqt_vtab", "vtab-sun397", 1), ("run_vqt_vtab_sparsity", "vtab-sun397", 1),
    ("run_vqt_vtab", 'vtab-smallnorb(predicted_attribute="label_elevation")', 10),
    ("run_vqt_vtab", 'vtab-clevr(task="closest_object_distance")', 10),
    ("run_vqt_vtab", "vtab-svhn", 20),
    ("run_vqt_vtab", "vtab-dmlab", 20),
    ("run_vqt_vtab", 'vtab-dsprites(predicted_attribute="label_x_position",num_classes=16)', 20),
    ("run_vqt_vtab", 'vtab-smallnorb(predicted_attribute="label_azimuth")', 20),
    ("run_vqt_vtab", 'vtab-kitti(task="closest_vehicle_distance")', 20),
]
# The release's data names (collect_demo_exp_results.py's `data_names`) -> ours.
_RELEASE_NAMES = {
    "vtab-caltech101": "caltech101", "vtab-dtd": "dtd",
    "vtab-cifar(num_classes=100)": "cifar100", "vtab-oxford_flowers102": "oxford_flowers102",
    "vtab-oxford_iiit_pet": "oxford_iiit_pet", "vtab-svhn": "svhn",
    "vtab-patch_camelyon": "patch_camelyon", "vtab-resisc45": "resisc45",
    "vtab-eurosat": "eurosat",
    'vtab-diabetic_retinopathy(config="btgraham-300")': "diabetic_retinopathy",
    "vtab-dmlab": "dmlab", 'vtab-clevr(task="closest_object_distance")': "clevr_distance",
    'vtab-clevr(task="count_all")': "clevr_count",
    'vtab-dsprites(predicted_attribute="label_orientation",num_classes=16)':
        "dsprites_orientation",
    'vtab-dsprites(predicted_attribute="label_x_position",num_classes=16)': "dsprites_location",
    'vtab-smallnorb(predicted_attribute="label_azimuth")': "smallnorb_azimuth",
    'vtab-smallnorb(predicted_attribute="label_elevation")': "smallnorb_elevation",
    'vtab-kitti(task="closest_vehicle_distance")': "kitti_distance",
    "vtab-sun397": "sun397",
}


def _release_collect(run_dirs: dict[str, set[str]]) -> dict[str, str]:
    """collect_demo_exp_results.py's choice of runs, transcribed: per data name, the
    `keep_frac_0.7/runN` results if the hyper-parameter directory holds `keep_frac_0.7`, else
    `runN`. `run_dirs`: data name -> the entries of its hyper-parameter directory."""
    return {name: "keep_frac_0.7/" if "keep_frac_0.7" in entries else ""
            for name, entries in run_dirs.items()}


def _release_outputs() -> dict[str, set[str]]:
    """What run_demo_exp.sh leaves in each task's final hyper-parameter directory: `runN` from
    run_vqt_vtab.sh, and `keep_frac_0.7` from run_vqt_vtab_sparsity.sh (the `featselect`
    output of head2toe_sparsity_train.py's setup)."""
    out: dict[str, set[str]] = {}
    for script, name, _ in _RUN_DEMO_EXP:
        entries = out.setdefault(name, set())
        entries.update({"run1", "run2", "run3", "run4", "run5"} if script == "run_vqt_vtab"
                       else {"keep_frac_0.7"})
    return out


def test_the_reported_number_is_the_releases_for_every_task():
    prefixes = _release_collect(_release_outputs())
    assert set(_RELEASE_NAMES) == set(prefixes) and set(_RELEASE_NAMES.values()) == set(
        tasks.TASKS)
    for release_name, prefix in prefixes.items():
        name = _RELEASE_NAMES[release_name]
        config = vtab.get_config(name)
        # A final run's results as the trainer writes them: a compression entry where the
        # compression stage ran.
        results = {"top1": 0.5}
        if config.compression.enabled:
            results["compression"] = {"top1": 0.25}
        number = protocol.reported(config, results)
        if prefix:  # keep_frac_0.7/runN: the compressed model's test top-1
            assert number == {"metric": "compression.top1", "top1": 0.25}, name
        else:
            assert number == {"metric": "top1", "top1": 0.5}, name
        # The T of the task's runs, too.
        (t,) = {t for _, n, t in _RUN_DEMO_EXP if n == release_name}
        assert config.model.num_queries == t, name
    # big_vision reports the trained model's number.
    bv = vtab.get_config("dtd,big_vision")
    assert protocol.reported(bv, {"top1": 0.5, "compression": {"top1": 0.25}})["metric"] == "top1"


def _erf_gelu(x: np.ndarray) -> np.ndarray:
    # torch.nn.functional.gelu's default (approximate='none'): x * Phi(x), with math.erf.
    return np.vectorize(lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))))(x)


def test_release_runs_exact_gelu():
    # h2t_vit.py: `self.act_fn = ACT2FN["gelu"]`, ACT2FN["gelu"] = torch.nn.functional.gelu.
    for name in tasks.TASKS:
        assert vtab.get_config(name).model.mlp_act == "gelu", name
    assert vtab.get_config("dtd,big_vision").model.mlp_act == "gelu_tanh"
    # The model built from the config runs that activation in its MLPs: a tiny model's MLP
    # block on inputs where the two GELUs differ.
    from vqt_jax.models import vit

    config = resolve.resolve(vtab.get_config("dtd"))
    assert train.build_model(config, num_classes=47).mlp_act == "gelu"
    block = vit.MlpBlock(mlp_dim=4, act=config.model.mlp_act)
    x = jnp.linspace(-3.0, 3.0, 24, dtype=jnp.float32).reshape(2, 3, 4)
    params = block.init(jax.random.key(0), x)
    d0, d1 = params["params"]["Dense_0"], params["params"]["Dense_1"]
    hidden = np.asarray(x) @ np.asarray(d0["kernel"]) + np.asarray(d0["bias"])
    expected = _erf_gelu(hidden.astype(np.float64)) @ np.asarray(d1["kernel"]) + np.asarray(
        d1["bias"])
    np.testing.assert_allclose(np.asarray(block.apply(params, x)), expected, atol=1e-5)
    tanh = vit.MlpBlock(mlp_dim=4, act="gelu_tanh").apply(params, x)
    assert np.max(np.abs(np.asarray(tanh) - expected)) > 1e-4  # the test tells them apart


def test_kept_features_are_truncated_as_the_release_counts_them():
    from vqt_jax import compression

    # src/models/build_h2t_model.py: int((768 + 768*12*num_q) * KEEP_FRAC) for ViT-B/16.
    for num_q in (1, 10, 20):
        total = 768 + 768 * 12 * num_q
        assert compression.num_to_keep(total, 0.7) == int(total * 0.7)
    assert compression.num_to_keep(9984, 0.7) == 6988
    # The head the compression stage keeps: the top int(F * keep_frac) columns.
    norms = np.arange(9984, dtype=np.float32)[::-1].copy()
    kernel = np.zeros((9984, 2), np.float32)
    kernel[:, 0] = norms
    assert len(compression.select_features(kernel, 0.7)) == 6988
