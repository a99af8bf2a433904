"""Where the cache of the frozen backbone lives: on each host's own disk ($VQT_JAX_CACHE/features)
whatever the workdir, unless `config.cache_dir` says otherwise; never in a (shared) workdir."""

from __future__ import annotations

import os
import re

import jax
import pytest

from tests import test_sweep, train_utils
from vqt_jax import cache as cache_lib
from vqt_jax import hosts, methods, resolve
from vqt_jax.training import caching, train

NUM_TRAIN = 24  # the folder's train/ split: 3 classes x 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return train_utils.make_image_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A fresh $VQT_JAX_CACHE: the tests never touch the user's own ~/.cache."""
    path = tmp_path / "vqt_jax_cache"
    monkeypatch.setenv("VQT_JAX_CACHE", str(path))
    return path


def _config(folder, **overrides):
    """The tiny cached run's config, resolved as a run resolves it (its model and cache key)."""
    return resolve.resolve(train_utils.tiny_config(data_dir=folder, cache="on", **overrides))


def _plan(config, workdir: str) -> caching.CachePlan:
    return caching.plan_cache(config, train.build_model(config, 3), NUM_TRAIN, workdir)


def _fingerprint(config) -> str:
    kwargs = methods.model_kwargs(config.method, dict(config.model))
    return cache_lib.fingerprint(config, kwargs, cache_lib.kind_for(config.method))


@pytest.mark.parametrize("where", ["local", "gs"])
def test_the_default_cache_is_in_vqt_jax_cache_not_in_the_workdir(folder, tmp_path, root,
                                                                  caplog, where):
    workdir = str(tmp_path / "wd") if where == "local" else "gs://bucket/sweep/dtd"
    config = _config(folder)
    plan = _plan(config, workdir)
    assert plan.path == str(root / "features" / _fingerprint(config))
    assert not plan.path.startswith(workdir)
    # The run says where its cache is, and that it is not in the workdir.
    assert any(plan.path in r.getMessage() and f"not the workdir {workdir}" in r.getMessage()
               for r in caplog.records), caplog.text


def test_without_vqt_jax_cache_the_default_is_under_the_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("VQT_JAX_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # not the user's own home
    assert caching.default_cache_dir() == str(tmp_path / "home" / ".cache" / "vqt_jax" /
                                            "features")


def test_an_explicit_cache_dir_wins(folder, tmp_path, root, caplog):
    mine = tmp_path / "on_the_shared_disk_after_all"
    config = _config(folder, cache_dir=str(mine))
    plan = _plan(config, str(tmp_path / "wd"))
    assert plan.path == str(mine / _fingerprint(config))
    assert not root.exists()
    assert "not the workdir" not in caplog.text  # that note is for the default only


def test_runs_in_other_workdirs_with_other_hyperparameters_share_one_entry(folder, tmp_path,
                                                                           root):
    a = _config(folder)
    b = _config(folder, lr=0.01, wd=0.0, seed=3)
    b.model.num_queries = 3
    assert _plan(a, str(tmp_path / "sweep1" / "a")).path == \
        _plan(b, str(tmp_path / "sweep2" / "b")).path


def test_every_host_keeps_its_copy_in_an_entry_of_its_own(folder, tmp_path, root,
                                                          monkeypatch, caplog):
    """Host 1 of 2: its own entry (cache_dir may be shared by the hosts), and the log says
    when the whole cache is on each host's disk, and why."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(hosts, "all_agree", bool)  # no other host to ask
    config = _config(folder)
    plan = _plan(config, str(tmp_path / "wd"))
    assert plan.path == str(root / "features" / f"{_fingerprint(config)}-host1")
    assert re.search(r"Every host keeps its own copy of the cache on its own disk: a complete "
                     r"one where the host cache serves what does not fit the devices \(it reads "
                     r"rows in any order\), else only its devices' rows", caplog.text), caplog.text


def test_a_sweep_leaves_cache_dir_to_the_default_or_the_user(tmp_path):
    """The sweep no longer points every run's cache into its workdir; a cache_dir given on
    the command line reaches every run as given."""
    _, trainer = test_sweep.run(tmp_path / "default", tasks=("dtd", "eurosat"), num_seeds=2)
    assert trainer.calls and all(not c.cache_dir for c, _ in trainer.calls)
    mine = str(tmp_path / "mine")
    _, trainer = test_sweep.run(tmp_path / "explicit", tasks=("dtd",), num_seeds=1,
                                overrides={"cache_dir": mine})
    assert trainer.calls and {c.cache_dir for c, _ in trainer.calls} == {mine}
    assert not os.path.exists(mine)  # the fake trainer builds nothing


def _mounts(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "mounts"
    path.write_text("".join(f"{line} rw,relatime 0 0\n" for line in lines))
    return str(path)


def test_a_network_file_system_is_told_from_the_mount_table(tmp_path, monkeypatch):
    home = tmp_path / "my home"  # the table writes its space as \040
    escaped = str(home).replace(" ", "\\040")
    monkeypatch.setattr(caching, "MOUNTS", _mounts(tmp_path, [
        "/dev/sda1 / ext4", f"server:/export {escaped} nfs4", f"tmpfs {escaped}/scratch tmpfs"]))
    (home / "scratch").mkdir(parents=True)
    # Not created yet: judged by the directory it would be created in.
    assert caching.network_file_system(str(home / ".cache" / "vqt_jax" / "features")) == "nfs4"
    assert caching.network_file_system(str(home / "scratch" / "features")) is None  # inner mount
    assert caching.network_file_system(str(tmp_path / "elsewhere")) is None
    monkeypatch.setattr(caching, "MOUNTS", str(tmp_path / "no such table"))
    assert caching.network_file_system(str(home)) is None


def test_a_cache_directory_on_a_network_file_system_is_warned_of(folder, tmp_path, root,
                                                                  monkeypatch, caplog):
    """As where the default is under an NFS home: the run says so and how to move it."""
    monkeypatch.setattr(caching, "MOUNTS", _mounts(tmp_path, [
        "/dev/sda1 / ext4", f"server:/export {tmp_path} nfs"]))
    config = _config(folder)
    plan = _plan(config, str(tmp_path / "wd"))
    assert (f"The cache directory {root / 'features'} is on a network file system (nfs): the "
            "memory-mapped cache will be read over the network; set config.cache_dir or "
            "$VQT_JAX_CACHE to a local disk.") in caplog.text
    assert plan.path.startswith(str(root))  # a warning: the run still caches there
    caplog.clear()
    monkeypatch.setattr(caching, "MOUNTS", _mounts(tmp_path, ["/dev/sda1 / ext4"]))
    _plan(config, str(tmp_path / "wd"))
    assert "network file system" not in caplog.text


def test_bfloat16_on_cpu_trains_the_query_path_without_a_cache(folder, tmp_path, root, caplog):
    """XLA:CPU cannot train the query path over a cache in bfloat16: 'auto' trains uncached
    and says why; float32, or a method whose cache holds features, still caches."""
    assert jax.default_backend() == "cpu"

    def plan(dtype, method="vqt"):
        config = _config(folder, method=method)
        config.cache = "auto"
        config.model.dtype = dtype
        return _plan(config, str(tmp_path / "wd"))

    assert plan("bfloat16") is None
    assert "Training without a cache: config.model.dtype='bfloat16' on CPU" in caplog.text
    assert plan("float32") is not None and plan("bfloat16", "linear") is not None
