"""The cache of the frozen backbone under faults: stale data, damaged files, killed builds,
full disks. Each fault must end in a correct cache or one clear message, never in silent
reuse of wrong contents, a crash or leftovers.

The module-level helpers (`tiny_backbone`, `build_tiny_cache`, `truncate_cache_file`, ...) are
meant for reuse by other tests.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from tests import train_utils
from vqt_jax import cache as cache_lib
from vqt_jax import data, methods
from vqt_jax.data import content, imaging
from vqt_jax.models import ViT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(patch_size=(8, 8), width=32, depth=2, mlp_dim=64, num_heads=4, num_classes=3,
            num_queries=1)
CACHE_FILES = ["cls.bin", "k.bin", "label.bin", "meta.json", "pooled.bin", "v.bin"]
FULL_DISK = re.compile(
    r"not enough disk space for the cache in (?P<dir>.+): it needs (?P<size>[\d.]+ \w+), "
    r"(?P<free>[\d.]+ \w+) free; free space, set config.cache_dir elsewhere, or "
    r"config.cache='off'$")


# ---------------------------------------------------------------------------------------------
# Fixture makers.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TinyBackbone:
    """A tiny model and data set, with everything `cache_lib.build` needs."""

    model: ViT
    variables: Any
    images: np.ndarray
    labels: np.ndarray
    spec: cache_lib.Spec
    mesh: Mesh
    batch_size: int


@functools.lru_cache
def _tiny_model(image_size: int) -> tuple[ViT, Any]:
    model = ViT(**TINY)
    # One compiled init: op-by-op initialisation compiles every op separately (slow).
    variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, image_size, image_size, 3)))
    return model, variables


def tiny_backbone(num_examples: int = 12, image_size: int = 16, kind: str = "kv",
                  images: np.ndarray | None = None,
                  labels: np.ndarray | None = None) -> TinyBackbone:
    """A deterministic tiny ViT (the same in every process) and uint8 images to cache."""
    if images is None:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (num_examples, image_size, image_size, 3), np.uint8)
        labels = np.arange(num_examples, dtype=np.int32) % TINY["num_classes"]
    num_examples, image_size = len(images), images.shape[1]
    model, variables = _tiny_model(image_size)
    spec = cache_lib.spec_for(model, kind, num_examples, image_size)
    devices = jax.devices()
    return TinyBackbone(model, variables, images, np.asarray(labels), spec,
                        Mesh(np.asarray(devices), ("data",)), len(devices))


def normalize_images(x: np.ndarray) -> np.ndarray:
    return data.normalize_array(x, "inception")


def build_tiny_cache(path: str | None, backbone: TinyBackbone | None = None,
                     normalize=normalize_images, **kwargs) -> cache_lib.Cache:
    """Builds the cache of `backbone` (default: `tiny_backbone()`) in `path`."""
    b = backbone or tiny_backbone()
    return cache_lib.build(b.spec, b.model, b.variables, b.images, b.labels, mesh=b.mesh,
                           batch_size=b.batch_size, normalize=normalize, path=path, **kwargs)


def cache_bytes(path: str) -> dict[str, bytes]:
    """Every file of a cache directory, by name."""
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = f.read()
    return out


def truncate_cache_file(path: str, name: str = "k.bin") -> None:
    """Cuts a cache file to half its size (a disk full or a copy cut short)."""
    file = os.path.join(path, name)
    os.truncate(file, os.path.getsize(file) // 2)


def delete_cache_file(path: str, name: str = "v.bin") -> None:
    os.remove(os.path.join(path, name))


def corrupt_meta(path: str) -> None:
    """Overwrites meta.json with a torn write."""
    with open(os.path.join(path, "meta.json"), "w") as f:
        f.write('{"version": 2, "ki')


DAMAGES = {
    "truncated": (truncate_cache_file, r"k\.bin has \d+ bytes instead of the \d+ meta\.json "
                                       r"records"),
    "deleted": (delete_cache_file, r"v\.bin is missing"),
    "bad meta": (corrupt_meta, r"meta\.json is unreadable \("),
}


def temporary_builds(directory: str) -> list[str]:
    """The temporary (unfinished) builds in a cache directory."""
    return sorted(n for n in os.listdir(directory) if ".tmp-" in n)


def move_images_between_classes(root: str, count: int = 4) -> None:
    """Moves `count` training images between class0 and class1, keeping both counts."""
    train = os.path.join(root, "train")
    half = count // 2
    for i in range(half):  # class0 -> class1 and class1 -> class0, same number each way
        os.rename(os.path.join(train, "class0", f"{i}.png"),
                  os.path.join(train, "class1", f"moved{i}.png"))
        os.rename(os.path.join(train, "class1", f"{half + i}.png"),
                  os.path.join(train, "class0", f"moved{half + i}.png"))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone()


@pytest.fixture(scope="module")
def reference(backbone, tmp_path_factory):
    """The files of an uninterrupted build of `backbone`."""
    path = str(tmp_path_factory.mktemp("reference") / "cache")
    build_tiny_cache(path, backbone)
    return cache_bytes(path)


# ---------------------------------------------------------------------------------------------
# 1. Freshness: the fingerprint follows the data's contents.
# ---------------------------------------------------------------------------------------------


def _fingerprint(config) -> str:
    kwargs = methods.model_kwargs(config.method, dict(config.model))
    return cache_lib.fingerprint(config, kwargs, "kv")


def test_moving_images_between_classes_changes_the_cache(tmp_path):
    root = train_utils.make_image_folder(tmp_path / "folder", counts=(("train", 4), ("val", 1)))
    config = train_utils.tiny_config(data_dir=root, image_size=16)
    before = _fingerprint(config)
    assert _fingerprint(config) == before  # nothing touched: the same cache
    images, labels = data.load_train_examples("folder", root, "val", 16)
    old = build_tiny_cache(str(tmp_path / "cache" / before), tiny_backbone(images=images,
                                                                           labels=labels))

    move_images_between_classes(root)
    after = _fingerprint(config)
    assert after != before
    images, labels = data.load_train_examples("folder", root, "val", 16)
    assert np.bincount(labels).tolist() == [4, 4, 4]  # the same counts, other labels
    assert cache_lib.open_cache(str(tmp_path / "cache" / after), old.spec) is None
    new = build_tiny_cache(str(tmp_path / "cache" / after), tiny_backbone(images=images,
                                                                          labels=labels))
    np.testing.assert_array_equal(new.labels, labels)
    # The listing is sorted by class, so the label column looks alike: follow each image (by
    # its cached features) from the old cache to the new one.
    changed = 0
    for row, cls in enumerate(old.arrays["cls"]):
        (match,) = np.flatnonzero(np.all(new.arrays["cls"] == cls, axis=1))
        changed += int(new.labels[match] != old.labels[row])
    assert changed == 4


def test_folder_key_covers_size_mtime_and_label(tmp_path):
    root = train_utils.make_image_folder(tmp_path, counts=(("train", 2), ("val", 1)))
    key = content.content_key("folder", root, "val")
    assert key["num_files"] == 6 and key["split"] == "val"
    assert content.content_key("folder", root + "/", "val") == key
    # train/ + val/ for the test split.
    assert content.content_key("folder", root, "test")["num_files"] == 9
    image = os.path.join(root, "train", "class2", "1.png")
    st = os.stat(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    touched = content.content_key("folder", root, "val")
    assert touched != key
    with open(image, "ab") as f:
        f.write(b"\0")
    assert content.content_key("folder", root, "val") != touched
    # Evaluation images are not in the training cache.
    st = os.stat(image)
    val_image = os.path.join(root, "val", "class0", "0.png")
    before = content.content_key("folder", root, "val")
    os.utime(val_image, ns=(st.st_atime_ns, st.st_mtime_ns + 5))
    assert content.content_key("folder", root, "val") == before


def _prepare_tfds(data_dir: str, version: str) -> None:
    """Writes the metadata of oxford_iiit_pet `version`, so TFDS sees it as prepared.

    This TFDS only has code for other versions, so the builder must read the version from
    the prepared dataset_info.json, as for a copy prepared by another TFDS release.
    """
    builder = tfds.builder("oxford_iiit_pet", data_dir=data_dir, try_gcs=False)
    split = tfds.core.SplitInfo(name="train", shard_lengths=[4000], num_bytes=0)
    builder.info.set_splits(tfds.core.SplitDict([split]))
    version_dir = builder.data_path.parent / version
    version_dir.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(version_dir)
    info_file = version_dir / "dataset_info.json"
    info = json.loads(info_file.read_text())
    info["version"] = version
    info_file.write_text(json.dumps(info))


def test_tfds_key_is_the_prepared_version_and_split(tmp_path, monkeypatch):
    data_dir = str(tmp_path / "tfds")
    requests = []
    real_builder = tfds.builder

    def builder(name, **kwargs):
        requests.append((name, kwargs.get("try_gcs")))
        return real_builder(name, **kwargs)

    def no_download(*a, **k):
        raise AssertionError("tried to download")

    with pytest.raises(data.DatasetNotPreparedError, match="'oxford_iiit_pet:3.*' .* not prepared"):
        content.content_key("oxford_iiit_pet", data_dir, "val")
    _prepare_tfds(data_dir, "3.2.0")
    monkeypatch.setattr(tfds, "builder", builder)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    key = content.content_key("oxford_iiit_pet", data_dir, "val")
    assert key == {"task": "oxford_iiit_pet", "dataset": "oxford_iiit_pet/3.2.0",
                   "version": "3.2.0", "split": "train[:800]",
                   "pipeline": imaging.IMPLEMENTATION}
    assert requests == [("oxford_iiit_pet:3.*.*", False)]
    assert content.content_key("oxford_iiit_pet", data_dir, "test")["split"] == (
        "train[:800]+train[2944:3144]")
    config = train_utils.tiny_config(task="oxford_iiit_pet", data_dir=data_dir)
    before = _fingerprint(config)
    # Another version prepared in the same data dir is other data: another cache. mock_data
    # reads the same metadata, so the key is the same under it.
    _prepare_tfds(data_dir, "3.3.0")
    with tfds.testing.mock_data(num_examples=2, data_dir=data_dir):
        assert content.content_key("oxford_iiit_pet", data_dir, "val")["version"] == "3.3.0"
        ds = real_builder("oxford_iiit_pet:3.*.*", data_dir=data_dir).as_dataset(split="train")
        assert len(list(ds)) == 2
    assert _fingerprint(config) != before


# ---------------------------------------------------------------------------------------------
# 2. Damaged caches are rebuilt, with one warning.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_cache_is_rebuilt(damage, backbone, reference, tmp_path, caplog):
    path = str(tmp_path / "cache")
    build_tiny_cache(path, backbone)
    make_damage, why = DAMAGES[damage]
    make_damage(path)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        # What caching.get_cache does: open, and build if that gives nothing.
        assert cache_lib.open_cache(path, backbone.spec) is None
        assert not os.path.exists(path)
        cache = build_tiny_cache(path, backbone)
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"Cache in {path} is unusable: ")
    assert re.search(why, warning), warning
    assert warning.endswith("; removing it and building it again.")
    assert "Traceback" not in caplog.text
    assert cache_bytes(path) == reference
    np.testing.assert_array_equal(cache.labels, backbone.labels)


def test_cache_of_other_contents_is_rebuilt(backbone, tmp_path, caplog):
    path = str(tmp_path / "cache")
    build_tiny_cache(path, backbone)
    other = dataclasses.replace(backbone.spec, num_examples=backbone.spec.num_examples + 1)
    with caplog.at_level(logging.WARNING):
        assert cache_lib.open_cache(path, other) is None
    (warning,) = _warnings(caplog)
    assert "describes other contents: num_examples 12 instead of 13" in warning
    assert not os.path.exists(path)


def test_complete_cache_is_reused_quietly(backbone, tmp_path, caplog):
    path = str(tmp_path / "cache")
    build_tiny_cache(path, backbone)
    with caplog.at_level(logging.INFO):
        cache = cache_lib.open_cache(path, backbone.spec)
    assert cache is not None and not _warnings(caplog)
    assert sorted(os.listdir(path)) == CACHE_FILES
    meta = json.loads(open(os.path.join(path, "meta.json")).read())
    assert meta["files"] == {n: os.path.getsize(os.path.join(path, n))
                             for n in CACHE_FILES if n != "meta.json"}


# ---------------------------------------------------------------------------------------------
# 3. Orphaned temporary builds.
# ---------------------------------------------------------------------------------------------

_KILLED_BUILD = """
import sys, time
from tests import test_cache_faults as t

def slow(x):
    time.sleep(600)  # killed long before this returns
    return t.normalize_images(x)

t.build_tiny_cache(sys.argv[1], normalize=slow)
"""


def test_killed_build_is_cleaned_up_by_the_next_run(backbone, reference, tmp_path, caplog):
    cache_dir = tmp_path / "caches"
    path = str(cache_dir / "abc123")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, path], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (cache_dir.exists() and temporary_builds(str(cache_dir))):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.05)
        time.sleep(0.5)  # let it reserve (some of) its files
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (orphan,) = temporary_builds(str(cache_dir))
    assert orphan.startswith(f".abc123.tmp-{cache_lib._host()}-{proc.pid}-")

    with caplog.at_level(logging.INFO):
        assert cache_lib.open_cache(path, backbone.spec) is None
        build_tiny_cache(path, backbone)
    assert temporary_builds(str(cache_dir)) == []
    assert os.listdir(cache_dir) == ["abc123"]
    assert f"Removed {cache_dir / orphan}: an interrupted cache build (process {proc.pid} " \
           "on this host is gone)." in caplog.text
    assert cache_bytes(path) == reference


def test_only_builds_of_dead_processes_on_this_host_are_removed(tmp_path):
    host, dead = cache_lib._host(), dead_pid()
    live = subprocess.Popen(["sleep", "60"])
    try:
        names = {
            "dead": f".abc.tmp-{host}-{dead}-x1y2",
            "dead, other cache": f".def-host1.tmp-{host}-{dead}-zz_9",
            "ours": f".abc.tmp-{host}-{os.getpid()}-q",
            "live": f".abc.tmp-{host}-{live.pid}-q",
            "other host": f".abc.tmp-elsewhere-{dead}-q",
            "older naming": ".abc.tmp-k3j4l5",
            "a cache": "abc",
        }
        for name in names.values():
            os.makedirs(tmp_path / name)
        removed = cache_lib.remove_orphaned_builds(str(tmp_path))
    finally:
        live.kill()
        live.wait()
    assert sorted(removed) == sorted(str(tmp_path / names[k]) for k in
                                     ("dead", "dead, other cache"))
    assert sorted(os.listdir(tmp_path)) == sorted(
        v for k, v in names.items() if not k.startswith("dead"))


def test_build_names_its_temporary_directory_after_its_process(backbone, tmp_path,
                                                                monkeypatch):
    seen = []

    def normalize(x):
        seen.extend(temporary_builds(str(tmp_path)))
        return normalize_images(x)

    build_tiny_cache(str(tmp_path / "abc"), backbone, normalize=normalize)
    assert seen and all(re.fullmatch(rf"\.abc\.tmp-{cache_lib._host()}-{os.getpid()}-\w+", n)
                        for n in seen)
    # A pid is the only thing the name needs to be unique per process: hosts with odd names
    # still give names that parse back.
    monkeypatch.setattr(cache_lib.socket, "gethostname", lambda: "node-7.example.org")
    assert cache_lib._host() == "node_7.example.org"


# ---------------------------------------------------------------------------------------------
# 4. Disk space.
# ---------------------------------------------------------------------------------------------


def _forbid_backbone(monkeypatch) -> list[int]:
    """Makes any backbone pass fail the test; returns the list normalize calls go to."""
    monkeypatch.setattr(jax, "jit", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("the backbone ran before the disk space was reserved")))
    return []


def test_full_disk_fails_clearly_before_the_backbone_runs(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    b = tiny_backbone()

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    calls = _forbid_backbone(monkeypatch)
    with pytest.raises(cache_lib.DiskSpaceError) as e:
        build_tiny_cache(str(directory / "abc"), b, normalize=lambda x: calls.append(1))
    assert calls == []
    assert isinstance(e.value, ValueError)
    match = FULL_DISK.match(str(e.value))
    assert match, str(e.value)
    assert match["dir"] == str(directory)
    assert match["size"] == cache_lib.format_size(b.spec.nbytes)
    assert os.listdir(directory) == []


def test_filesystems_without_fallocate_get_zeros_written(backbone, reference, tmp_path,
                                                         monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    reserved = []
    real_write_zeros = cache_lib._write_zeros

    def write_zeros(fd, size):
        reserved.append(size)
        real_write_zeros(fd, size)

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    monkeypatch.setattr(cache_lib, "_write_zeros", write_zeros)
    path = str(tmp_path / "cache")
    build_tiny_cache(path, backbone)
    assert sorted(reserved) == sorted(backbone.spec.file_sizes.values())
    assert cache_bytes(path) == reference


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs (needs mount permission: root, or CAP_SYS_ADMIN)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {getattr(e, 'stderr', b'') or e}")
    try:
        yield mount_point
    finally:
        # A file still mapped (say, by a failing test's traceback) makes it busy: detach it
        # lazily then, rather than leave a mount behind.
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_full_tmpfs(small_tmpfs, monkeypatch):
    fits = tiny_backbone(num_examples=12)
    assert fits.spec.nbytes < 100 * 1024
    build_tiny_cache(str(small_tmpfs / "fits"), fits)
    too_big = tiny_backbone(num_examples=120)
    assert too_big.spec.nbytes > 256 * 1024
    calls = _forbid_backbone(monkeypatch)
    with pytest.raises(cache_lib.DiskSpaceError) as e:
        build_tiny_cache(str(small_tmpfs / "big"), too_big, normalize=lambda x: calls.append(1))
    assert calls == []
    match = FULL_DISK.match(str(e.value))
    assert match and match["dir"] == str(small_tmpfs), str(e.value)
    assert match["free"].endswith("KiB")
    assert sorted(os.listdir(small_tmpfs)) == ["fits"]


def test_sizes_are_in_readable_units(backbone):
    assert [cache_lib.format_size(n) for n in (0, 1023, 1536, 5 * 2**20, 3 * 2**30 // 2)] == [
        "0 B", "1023 B", "1.50 KiB", "5.00 MiB", "1.50 GiB"]
    assert backbone.spec.describe().endswith(f"= {cache_lib.format_size(backbone.spec.nbytes)}")
    assert "KiB" in backbone.spec.describe()
    why = cache_lib.check_budget(backbone.spec, None, 1e-6)
    assert re.fullmatch(r"the cache would take [\d.]+ KiB = [\d.e-]+ GiB, over "
                        r"config.cache_max_gb=1e-06", why), why
    huge = dataclasses.replace(backbone.spec, num_examples=10**12)
    why = cache_lib.check_budget(huge, "/", 1e9)
    assert re.fullmatch(r"the cache would take [\d.]+ TiB but / has [\d.]+ [KMGT]?i?B free",
                        why), why


# ---------------------------------------------------------------------------------------------
# 5. Progress.
# ---------------------------------------------------------------------------------------------


def test_build_logs_progress(backbone, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        build_tiny_cache(str(tmp_path / "cache"), backbone, progress_every_s=0)
    # The first batch (it compiles) gives a rate but no ETA: ETAs come from the steady rate.
    assert re.search(r"Caching the frozen backbone's outputs: 8/12 examples \(67%\), "
                     r"[\d.]+ (examples/s|s per example)$", caplog.text, re.M), caplog.text
