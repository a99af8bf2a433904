"""A checkpoint save onto a disk that really fills up: one error, no orbax tracebacks, nothing
left behind. The disk is a small tmpfs (mounting one needs root; skipped elsewhere)."""

import errno
import os
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from vqt_jax.training import checkpointing


@pytest.fixture
def tiny_disk(tmp_path):
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)],
                             capture_output=True, check=False)
    if mounted.returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


# After the failed write, one of orbax's signalling threads may still post to its event loop
# once that loop is closed; Python reports it as unraisable, whenever it happens to run.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_save_on_a_full_disk_raises_once_and_cleans_up(tiny_disk, capfd, caplog):
    manager = checkpointing.manager(str(tiny_disk / "run"), 2)
    state = {"w": jnp.asarray(np.random.default_rng(0).random((512, 512), np.float32)),
             "count": jnp.zeros((), jnp.int32)}
    with pytest.raises(OSError) as e:
        checkpointing.save(manager, 1, state)
    manager.close()
    assert e.value.errno == errno.ENOSPC
    assert str(tiny_disk / "run" / "checkpoints") in str(e.value)
    err = capfd.readouterr().err + "".join(
        f"{r.getMessage()} {r.exc_info}" for r in caplog.records if r.levelname == "ERROR")
    assert "Traceback" not in err and "RESOURCE_EXHAUSTED" not in err, err
    assert os.listdir(tiny_disk / "run" / "checkpoints") == []


class _FailingStore:
    """A checkpoint manager of a gs:// run whose store fails every call, as gcsfs and
    tensorstore do (not an OSError with an errno)."""

    directory = checkpointing.checkpoint_dir("gs://bucket/run")

    def _fail(self, *args, **kwargs):
        raise RuntimeError("401 Anonymous caller does not have storage.objects.get access")

    save = latest_step = restore = _fail


@pytest.mark.parametrize("op", ["save", "restore"])
def test_a_remote_checkpoint_failure_is_one_error_naming_the_directory(op):
    from vqt_jax import workdir  # noqa: PLC0415

    with pytest.raises(workdir.WorkdirError) as e:
        if op == "save":
            checkpointing.save(_FailingStore(), 1, {"count": jnp.zeros(())})
        else:
            checkpointing.restore_latest(_FailingStore(), {"count": jnp.zeros(())})
    assert str(e.value).startswith("gs://bucket/run/checkpoints: cannot ")
    assert "remote file" in str(e.value) and "401 Anonymous caller" in str(e.value)
