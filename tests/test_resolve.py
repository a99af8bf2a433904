"""The one resolve step (vqt_jax/resolve.py): it fills unset fields only, it is what a run
records in config.json (main.py's command line and the sweep's runs), and it is idempotent."""

from __future__ import annotations

import functools
import json
import os

import pytest

from configs import vtab
from tests import tiny_config, train_utils
from vqt_jax import cli, methods, preparations, resolve
from vqt_jax import sweep as sweep_lib
from vqt_jax import workdir as workdir_lib
from vqt_jax.checkpoints import introspect
from vqt_jax.training import train

ARGS = ["dtd", "dtd,big_vision", "svhn", "clevr_count,big_vision", "folder"]
OVERRIDES = [None, {"method": "full"}, {"method": "linear", "batch_size": 64}, {"lr": 0.3},
             {"method": "vpt_deep", "warmup_epochs": 3, "model.num_queries": 5}]


def flat(config) -> dict:
    """The config as config.json stores it, under dotted names."""
    return workdir_lib.flatten(workdir_lib.as_dict(config))


def read_config_json(workdir) -> dict:
    return json.loads(open(os.path.join(workdir, workdir_lib.CONFIG_FILE)).read())


@pytest.fixture(autouse=True)
def _empty_download_cache(monkeypatch, tmp_path):
    # configs/vtab.py's default init is a URL: not downloaded, its 'auto' options are defaults.
    monkeypatch.setenv("VQT_JAX_CACHE", str(tmp_path / "downloads"))


@pytest.mark.parametrize("overrides", OVERRIDES, ids=str)
@pytest.mark.parametrize("arg", ARGS)
def test_resolve_keeps_every_set_field_and_fills_unset_ones_from_the_recipe(arg, overrides):
    config = vtab.get_config(arg)
    original = flat(config)
    given = {**original, **(overrides or {})}  # what get_config and the overrides set
    out = flat(resolve.resolve(config, overrides))
    assert flat(config) == original  # the input is not modified
    assert set(out) == set(given)  # no field added or lost
    recipe = methods.get(given["method"])
    filled = {}
    for key, value in given.items():
        if value == resolve.AUTO and key.startswith("model."):  # no file here: the defaults
            assert out[key] == introspect.DEFAULTS[key.removeprefix("model.")], key
        elif value is not None:
            assert out[key] == value, key
        elif out[key] is not None:
            filled[key] = out[key]
    # Only the method's recipe fills anything unset here (configs/vtab.py prepares nothing),
    # and it fills every recipe field left unset.
    assert filled == {k: getattr(recipe, k) for k in methods.RECIPE_FIELDS if given[k] is None}
    assert set(filled) == {k for k in methods.RECIPE_FIELDS if given[k] is None}


@pytest.mark.parametrize("overrides", OVERRIDES, ids=str)
@pytest.mark.parametrize("arg", ["dtd", "folder,big_vision"])
def test_resolve_is_idempotent(arg, overrides):
    once = resolve.resolve(vtab.get_config(arg), overrides)
    assert flat(resolve.resolve(once)) == flat(once)
    assert flat(resolve.resolve(once, overrides)) == flat(once)


def test_build_model_refuses_an_unresolved_config():
    """A config is resolved once, by its caller; `train.build_model` does not resolve it again
    but names the options still 'auto', so a skipped resolve step cannot pass silently."""
    config = vtab.get_config("dtd")
    with pytest.raises(ValueError) as e:
        train.build_model(config, num_classes=47)
    assert str(e.value) == ("config.model.variant, config.model.layerscale, "
                            "config.model.num_registers, config.model.pool_type are 'auto': "
                            "resolve the config first (vqt_jax.resolve.resolve)")
    # The attention implementation is the model's own choice ('auto' by platform), not one
    # that resolve fills: a resolved config may keep it.
    config.model.attention = "auto"
    model = train.build_model(resolve.resolve(config), num_classes=47)
    assert model.attention == "auto"
    one = resolve.resolve(train_utils.tiny_config(data_dir="/nowhere"))
    train.build_model(one, num_classes=3)
    one.model.layerscale = resolve.AUTO  # e.g. set again after resolving
    with pytest.raises(ValueError, match=r"^config\.model\.layerscale is 'auto': resolve the "
                                         r"config first \(vqt_jax\.resolve\.resolve\)$"):
        train.build_model(one, num_classes=3)
    assert train.build_model(resolve.resolve(config), num_classes=47).num_classes == 47


def test_unknown_override_names_the_key():
    config = vtab.get_config("dtd")
    with pytest.raises(KeyError, match="'model.nope'"):
        resolve.resolve(config, {"model.nope": 1})
    with pytest.raises(KeyError, match="'learning_rate'"):
        resolve.resolve(config, {"learning_rate": 0.1})
    with pytest.raises(KeyError, match="'lr.x'.*'lr' is not a nested config"):
        resolve.resolve(config, {"lr.x": 0.1})
    with pytest.raises(TypeError):
        resolve.resolve(config, {"epochs": "ten"})


def test_a_preparation_fills_unset_fields_only(monkeypatch, tmp_path):
    def fills(c):
        if c.data_dir is None:
            c.data_dir = "/prepared"

    def overwrites(c):
        c.lr = 1.0

    monkeypatch.setitem(preparations.PREPARATIONS, "fills", fills)
    monkeypatch.setitem(preparations.PREPARATIONS, "overwrites", overwrites)
    config = vtab.get_config("folder")
    assert resolve.resolve(config, {"prepare": "fills"}).data_dir == "/prepared"
    assert resolve.resolve(config, {"prepare": "fills", "data_dir": "/mine"}).data_dir == "/mine"
    with pytest.raises(ValueError, match=r"config.prepare='overwrites' changed lr \(0.125 -> 1.0"):
        resolve.resolve(config, {"prepare": "overwrites"})
    # The demo's own preparation leaves what the user set alone, and then has nothing to do.
    monkeypatch.setenv("VQT_JAX_CACHE", str(tmp_path))
    from configs import demo

    out = resolve.resolve(demo.get_config(), {"data_dir": "/data", "init": ""})
    assert (out.data_dir, out.init) == ("/data", "")
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return train_utils.make_image_folder(tmp_path_factory.mktemp("resolve_data"))


def test_main_records_the_resolved_config_of_its_command_line(folder, tmp_path):
    workdir = str(tmp_path / "wd")
    # main.py's path: config_flags applies the --config.FIELD flags, the trainer resolves.
    options = cli.parse(["main.py", f"--config=tests/tiny_config.py:{folder}",
                         f"--workdir={workdir}", "--config.method=full", "--config.epochs=2",
                         "--config.lr=0.01", "--config.model.query_dropout=0.0"])
    results = train.train_and_evaluate(options.config, options.workdir)
    overrides = {"method": "full", "epochs": 2, "lr": 0.01, "model.query_dropout": 0.0}
    expected = flat(resolve.resolve(tiny_config.get_config(folder), overrides))
    recorded = workdir_lib.flatten(read_config_json(workdir))
    assert recorded == expected
    assert workdir_lib.flatten(results["config"]) == expected
    # Filled from full fine-tuning's recipe: the optimiser only (tiny_config sets the rest).
    assert (recorded["optimizer"], recorded["batch_size"], recorded["warmup_epochs"]) == (
        "adamw", 8, 1)


def test_a_sweep_run_records_resolve_of_its_base_and_run_overrides(folder, tmp_path,
                                                                   monkeypatch):
    grid = sweep_lib.Grid((0.1,), (0.0,))
    monkeypatch.setattr(sweep_lib, "grid_for", lambda method: grid)
    config_fn = functools.partial(train_utils.tiny_config, data_dir=folder, epochs=1)
    overrides = {"model.num_queries": 3}
    sweep_lib.run_sweep(["folder"], tmp_path, base_config_fn=config_fn, method="vqt",
                        num_seeds=1, overrides=overrides, task_groups={"folder": "custom"},
                        program="sequential")
    base = resolve.resolve(config_fn("folder"), {**overrides, "task": "folder", "method": "vqt"})
    [(lr, wd)] = grid.points(base.batch_size)
    runs = {
        sweep_lib.val_run_dir(tmp_path, "folder", lr, wd):
            {"split": "val", "lr": lr, "wd": wd, "seed": sweep_lib.VAL_SEED,
             "compression.enabled": False},
        sweep_lib.test_run_dir(tmp_path, "folder", 0):
            {"split": "test", "lr": lr, "wd": wd, "seed": 0},
    }
    for run_dir, run_overrides in runs.items():
        recorded = workdir_lib.flatten(read_config_json(str(run_dir)))
        assert recorded == flat(resolve.resolve(base, run_overrides)), run_dir
        assert recorded["model.num_queries"] == 3
