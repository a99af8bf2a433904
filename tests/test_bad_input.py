"""Bad input, end to end through main.py's command line: one `error:` line, nothing lost.

Every case runs `main.py`'s own entry (`cli.run`, in-process) on a tiny model and asserts:
  * exit status 2 and exactly one line on stderr, `error: ...`, naming the problem;
  * where the cause is knowable before compilation, that the model never compiled
    (no `jit(init)` reached XLA);
  * that nothing in the workdir, the download cache or the data changed (every file's size
    and modification time before and after).
The details of each area are tested beside it (test_downloads, test_checkpoint_files,
test_images, test_cache_faults, test_workdir); this table proves each reaches the user as
one clear line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from jax import monitoring

from tests import test_checkpoint_files as ckpt_files
from tests import test_downloads as downloads
from tests import test_images as images
from tests import train_utils
from tests.test_workdir import snapshot
from vqt_jax import cli, resolve
from vqt_jax import workdir as workdir_lib
from vqt_jax.training import caching

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every program lowered for XLA (whether then compiled or read from a compilation cache).
COMPILED: list[str] = []
monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: COMPILED.append(kw.get("fun_name", ""))
    if name == "/jax/core/compile/jaxpr_to_mlir_module_duration" else None)
MODEL_PROGRAMS = ("jit(init)", "jit(sharded_step)", "jit(forward)")


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return train_utils.make_image_folder(tmp_path_factory.mktemp("data") / "folder", size=16)


@pytest.fixture(scope="module")
def finished(base_folder, tmp_path_factory):
    """A workdir as a finished run of the tiny config leaves it, to be re-run with changes.

    Only what the guard reads is real (config.json of exactly the command's config); the
    results and checkpoint stand in for a run's (test_workdir.py guards real finished runs).
    """
    workdir = tmp_path_factory.mktemp("finished") / "wd"
    workdir.mkdir()
    options = cli.parse(["main.py", f"--config=tests/tiny_config.py:{base_folder}",
                         f"--workdir={workdir}", "--config.epochs=1"])
    # As a run records it: with the method's release recipe filled in (train.plan_run).
    workdir_lib.record(str(workdir), resolve.resolve(options.config), None, 0)
    (workdir / "results.json").write_text('{"top1": 0.5}\n')
    (workdir / "checkpoints" / "5").mkdir(parents=True)
    (workdir / "checkpoints" / "5" / "_METADATA").write_text("{}\n")
    return str(workdir)


class Case:
    """What a case needs: a scratch dir, the folder, a workdir, the env (monkeypatch)."""

    def __init__(self, tmp_path, base_folder, finished, monkeypatch, stack):
        self.tmp, self.finished, self.monkeypatch, self.stack = tmp_path, finished, \
            monkeypatch, stack
        self.folder = str(tmp_path / "folder")
        shutil.copytree(base_folder, self.folder)
        self.workdir = str(tmp_path / "wd")
        self.cache = tmp_path / "download_cache"
        self.cache.mkdir()
        monkeypatch.setenv("VQT_JAX_CACHE", str(self.cache))
        monkeypatch.setenv("VQT_JAX_DOWNLOAD_STALL_S", "1")
        monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")

    def serve(self, handler) -> str:
        return self.stack.enter_context(downloads.serve(handler))


def _ro_dir(case: Case) -> str:
    """A read-only directory: a read-only tmpfs where mounting works, else a stubbed mkdir."""
    target = case.tmp / "readonly"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(target)],
                             capture_output=True).returncode == 0
    if mounted:
        case.stack.callback(subprocess.run, ["umount", str(target)], check=False)
    else:
        from etils import epath

        def read_only(self, *args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

        case.monkeypatch.setattr(epath.Path, "mkdir", read_only)
    return str(target / "wd")


def _ro_mount(target, stack) -> str:
    """`target` as a read-only tmpfs (skips where mounting is not allowed)."""
    target.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64m", "tmpfs", str(target)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    stack.callback(subprocess.run, ["umount", str(target)], check=False)
    return str(target)


def _full_disk_at_save(case: Case) -> None:
    """A checkpoint save that fails as tensorstore's does on a full disk, leaving its temporary
    directory; after the run, no `*.orbax-checkpoint-tmp*` may remain."""
    import orbax.checkpoint as ocp

    def no_space(self, step, *args, **kwargs):
        (self.directory / f"{step}.orbax-checkpoint-tmp-7").mkdir(parents=True)
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "opt_state.count/0" in OCDBT database')

    case.monkeypatch.setattr(ocp.CheckpointManager, "save", no_space)
    left = lambda: [p for p in (case.tmp / "wd" / "checkpoints").glob("*") if "tmp" in p.name]
    case.stack.callback(lambda: [] == left() or pytest.fail(f"left behind: {left()}"))


def _full_disk(case: Case) -> None:
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    case.monkeypatch.setattr(os, "posix_fallocate", no_space)


def _nan_weights(case: Case) -> str:
    path = case.tmp / "nan.npz"
    with np.load(train_utils.GOLDEN / "bv_vit.npz") as z:
        flat = {k: z[k] for k in z.files}
    flat["params/embedding/kernel"] = flat["params/embedding/kernel"].copy()
    flat["params/embedding/kernel"].flat[3] = np.nan
    np.savez(path, **flat)
    return str(path)


def _remote_denied(case: Case) -> str:
    from etils import epath

    case.monkeypatch.setattr(epath, "Path", ckpt_files.fake_remote(
        exists_error=ckpt_files.PermissionDeniedError("HTTP response code 403")))
    return "gs://some-bucket/vit.npz"


def _eval_class_of_tiffs(case: Case) -> None:
    d = os.path.join(case.folder, "test", "class2")
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    images.write_image(os.path.join(d, "a.tiff"), images.noise(), "TIFF")


def _init_served(make_handler):
    """A case setup whose checkpoint URL is served by `make_handler()` on 127.0.0.1."""
    return lambda c: dict(argv=[f"--config.init={c.serve(make_handler())}/v.npz"])


def _config_json_a_list(case: Case) -> str:
    (case.tmp / "listed").mkdir()
    (case.tmp / "listed" / "config.json").write_text("[1, 2]\n")
    return str(case.tmp / "listed")


def _finished_workdir(case: Case) -> str:
    return case.finished


# name -> (setup(case) -> {"argv": [...], "workdir": ...}, error regex, before compilation).
CASES = {
    "reused workdir, lr and wd changed": (
        lambda c: dict(workdir=_finished_workdir(c), argv=["--config.epochs=1",
                                                           "--config.lr=0.5", "--config.wd=0"]),
        r"workdir .* holds a run with another config \(lr: 0\.05 \(recorded\) vs 0\.5 \(now\); "
        r"wd: 0\.001 \(recorded\) vs 0\.0 \(now\)\)", True),
    "reused workdir, epochs changed": (
        lambda c: dict(workdir=_finished_workdir(c), argv=["--config.epochs=2"]),
        r"epochs: 1 \(recorded\) vs 2 \(now\)", True),
    "reused workdir, num_queries changed": (
        lambda c: dict(workdir=_finished_workdir(c),
                       argv=["--config.epochs=1", "--config.model.num_queries=5"]),
        r"model\.num_queries: 2 \(recorded\) vs 5 \(now\)", True),
    "config.json not an object": (
        lambda c: dict(workdir=_config_json_a_list(c), argv=[]),
        r"listed/config\.json cannot be read \(it holds a JSON list, not an object\)", True),
    "download shorter than Content-Length": (
        _init_served(lambda: downloads.short_body(downloads.NPZ)),
        r"Could not download http://127\.0\.0\.1:\d+/v\.npz: the server announced \d+ "
        r"bytes \(Content-Length\) but sent \d+; nothing was cached", True),
    "download cut without Content-Length": (
        _init_served(lambda: downloads.cut_without_length(downloads.NPZ)),
        r"Could not download .*/v\.npz: the file is incomplete", True),
    "download is an HTML page": (
        _init_served(downloads.html_page),
        r"Could not download .*: not a checkpoint: the server sent text/html", True),
    "download stalls": (
        _init_served(lambda: downloads.trickle(downloads.NPZ, every_s=20)),
        r"Could not download .*: the transfer stalled", True),
    "checkpoint holds NaN weights": (
        lambda c: dict(argv=[f"--config.init={_nan_weights(c)}"]),
        r"nan\.npz: 1 tensor holds NaN or inf values, e\.g\. embedding/kernel", True),
    "crafted .pth past its storage": (
        lambda c: dict(argv=["--config.init="
                             f"{ckpt_files.write_bad_pth(c.tmp / 'bad.pth', 'offset_past_end')[0]}"
                             ]),
        r"bad\.pth: .*tensor 'w' \(storage '0': 6 float32 elements\): .*past the end", True),
    "safetensors of an unsupported dtype": (
        lambda c: dict(argv=["--config.init=" + str(ckpt_files.write_bad_safetensors(
            c.tmp / "f8.safetensors", "unsupported_dtype")[0])]),
        r"f8\.safetensors: .*tensor 'w' has dtype 'F8_E4M3FNUZ', which this reader does not "
        r"support", True),
    "unreachable gs:// checkpoint": (
        lambda c: dict(argv=[f"--config.init={_remote_denied(c)}"]),
        r"gs://some-bucket/vit\.npz: cannot reach the remote file \(PermissionDeniedError", True),
    "missing checkpoint file": (
        lambda c: dict(argv=[f"--config.init={c.tmp}/nope.npz"]),
        r"checkpoint file not found: .*/nope\.npz", True),
    "truncated PNG in test/": (
        lambda c: dict(argv=[], _=images.write_truncated_png(
            os.path.join(c.folder, "test", "class1", "bad.png"))),
        r"Cannot decode 1 image in .* \(.*/test/class1/bad\.png: Invalid PNG data", True),
    "truncated JPEG in train/": (
        lambda c: dict(argv=[], _=images.write_truncated_jpeg(
            os.path.join(c.folder, "train", "class0", "bad.jpg"))),
        r"Cannot decode 1 image in .*/train/class0/bad\.jpg", True),
    "test class of only unreadable formats": (
        lambda c: dict(argv=[], _=_eval_class_of_tiffs(c)),
        r"Class folder .*/test/class2 holds 1 files? but no .*images", True),
    "unprepared TFDS task": (
        lambda c: dict(argv=["--config.task=dtd", f"--config.data_dir={c.tmp}/tfds"]),
        r"TFDS dataset 'dtd:3\.\*\.\*' \(VTAB-1k task 'dtd'\) is not prepared in .*/tfds; "
        r"this code never downloads\. .* python -c \"import tensorflow_datasets as tfds; "
        r"tfds\.builder\('dtd:3\.\*\.\*', data_dir='.*/tfds', file_format='array_record'\)"
        r"\.download_and_prepare\(\)\"",
        True),
    "misspelled config field": (
        lambda c: dict(argv=["--config.lrr=0.1"]),
        r"config\.lrr: the config has no such field \(Did you mean \"lr\"", True),
    "lr=inf": (lambda c: dict(argv=["--config.lr=inf"]),
               r"config\.lr must be a finite number, got inf", True),
    "max_loss=0": (lambda c: dict(argv=["--config.max_loss=0"]),
                   r"config\.max_loss must be > 0, got 0", True),
    "scalar patch size": (lambda c: dict(argv=["--config.model.patch_size=5"]),
                          r"config\.model\.patch_size=\(5,\): a \(height, width\) pair", True),
    "num_devices beyond the devices": (
        lambda c: dict(argv=["--config.num_devices=16"]),
        r"config\.num_devices=16 but only 8 CPU devices are available", True),
    "unknown pooling": (
        lambda c: dict(argv=["--config.model.pool_type=mean"]),
        r"config\.model\.pool_type='mean': choose from tok, gap, map", True),
    "unknown position-embedding rule": (
        lambda c: dict(argv=["--config.posemb_resample=nearest"]),
        r"config\.posemb_resample='nearest': choose from .*bilinear_corners.*bicubic", True),
    "unknown kv_dtype": (
        lambda c: dict(argv=["--config.model.kv_dtype=float8"]),
        r"config\.model\.kv_dtype='float8': an unknown dtype", True),
    "cache over its budget": (
        lambda c: dict(argv=["--config.cache=on", "--config.cache_max_gb=1e-6"]),
        r"config\.cache='on' but the cache would take [\d.]+ KiB = [\d.]+ GiB, over "
        r"config\.cache_max_gb=1e-06",
        True),
    "bfloat16 from a cache on CPU": (
        lambda c: dict(argv=["--config.cache=on", "--config.model.dtype=bfloat16"]),
        r"config\.cache='on' but config\.model\.dtype='bfloat16' on CPU: XLA's CPU backend "
        r"\(jax [\d.]+\) has no bfloat16 x bfloat16 -> float32 matmul.*; use config\.cache='auto'",
        True),
    "disk full for the cache": (
        lambda c: dict(argv=["--config.cache=on"], _=_full_disk(c)),
        r"not enough disk space for the cache in .*: it needs [\d.]+ KiB", False),
    "read-only cache_dir": (
        lambda c: dict(argv=["--config.cache=on",
                             f"--config.cache_dir={_ro_mount(c.tmp / 'ro_cache', c.stack)}"]),
        r"config\.cache='on' but the cache directory .*/ro_cache cannot be written \(.*\): "
        r"set config\.cache_dir or \$VQT_JAX_CACHE to a writable directory", True),
    "disk full during a checkpoint save": (
        lambda c: dict(argv=["--config.cache=off"], _=_full_disk_at_save(c)),
        r"no space left on device writing .*/wd/checkpoints: free space and re-run", False),
    "read-only workdir": (
        lambda c: dict(workdir=_ro_dir(c), argv=[]),
        r"cannot write .*/readonly/wd: Read-only file system; use a writable --workdir",
        True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line_and_changes_nothing(name, base_folder, finished, tmp_path,
                                                         monkeypatch, capsys):
    setup, pattern, before_compilation = CASES[name]
    monkeypatch.chdir(REPO)
    with contextlib.ExitStack() as stack:
        case = Case(tmp_path, base_folder, finished, monkeypatch, stack)
        spec = setup(case)
        workdir = spec.get("workdir", case.workdir)
        watched = [case.cache, case.folder] + ([workdir] if os.path.isdir(workdir) else [])
        before = {str(d): snapshot(d) for d in watched}
        existed = os.path.exists(workdir)
        COMPILED.clear()
        capsys.readouterr()
        code = cli.run(["main.py", f"--config=tests/tiny_config.py:{case.folder}",
                        f"--workdir={workdir}", *spec["argv"]])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(pattern, err[0]), err[0]
    if before_compilation:
        assert not [f for f in COMPILED if f in MODEL_PROGRAMS], COMPILED
    assert {str(d): snapshot(d) for d in watched} == before
    if not existed:
        # A new workdir may hold the run's config (written before training) and logs, never a
        # checkpoint or results.
        assert not os.path.exists(os.path.join(workdir, "results.json"))
        assert not os.path.exists(os.path.join(workdir, "checkpoints")) or not [
            s for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
        # No cache either (caches go to $VQT_JAX_CACHE/features, caching.default_cache_dir).
        cache_dir = os.path.join(case.cache, "features")
        assert not os.path.exists(cache_dir) or os.listdir(cache_dir) == []


def test_a_full_disk_with_cache_auto_trains_without_the_cache(base_folder, tmp_path, monkeypatch,
                                                              caplog):
    """'auto' means "cache when it can": a full disk is a warning and an uncached run."""
    from vqt_jax.training import train

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    monkeypatch.setenv("VQT_JAX_CACHE", str(tmp_path / "vqt_jax_cache"))
    config = train_utils.tiny_config(data_dir=base_folder, epochs=1, cache="auto")
    results, _ = train.run(config, str(tmp_path / "wd"))
    assert results["cached"] is False and results["num_eval_examples"] == 15
    assert any("Training without a cache: not enough disk space" in r.getMessage()
               for r in caplog.records)
    assert os.listdir(tmp_path / "vqt_jax_cache" / caching.FEATURES_SUBDIR) == []


def test_a_read_only_cache_dir_with_cache_auto_trains_without_the_cache(base_folder, tmp_path,
                                                                         caplog):
    """'auto' with a cache directory it cannot write: a warning naming it, and an uncached run."""
    from vqt_jax.training import train

    with contextlib.ExitStack() as stack:
        ro = _ro_mount(tmp_path / "ro_cache", stack)
        config = train_utils.tiny_config(data_dir=base_folder, epochs=1, cache="auto",
                                         cache_dir=ro)
        results, _ = train.run(config, str(tmp_path / "wd"))
    assert results["cached"] is False
    assert any(f"Training without a cache: the cache directory {ro} cannot be written"
               in r.getMessage() for r in caplog.records)


def test_dry_run_checks_the_cache_directory(base_folder, tmp_path, capsys):
    """--dry_run plans the cache as the run would: an unwritable cache directory is the run's
    error with cache='on', and a note that it trains uncached with 'auto'."""
    with contextlib.ExitStack() as stack:
        ro = _ro_mount(tmp_path / "ro_cache", stack)
        args = ["main.py", f"--config=tests/tiny_config.py:{base_folder}",
                f"--workdir={tmp_path / 'wd'}", f"--config.cache_dir={ro}", "--dry_run"]
        assert cli.run([*args, "--config.cache=on"]) == 2
        err = capsys.readouterr().err
        assert f"the cache directory {ro} cannot be written" in err, err
        assert cli.run([*args, "--config.cache=auto"]) == 0
        out = capsys.readouterr()
        assert "would train without a cache" in out.out + out.err
