"""gs:// through gcsfs, with TensorFlow installed: no TensorFlow import, one `error:` line.

etils.epath serves gs:// through tf.io.gfile wherever TensorFlow is importable; vqt_jax makes
it use fsspec (gcsfs) instead (`hosts.py`). A failure of the store, whatever gcsfs
raises, ends as the command line's one `error:` line naming the gs:// path (`cli.user_error`).
Everything runs in one fresh interpreter, where TensorFlow is importable but not yet imported
and epath has chosen no backend yet; gcsfs is replaced by fake stores, so nothing reaches the
network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests import xla_env

if importlib.util.find_spec("tensorflow") is None:  # The point: importable, and not imported.
    pytest.skip("TensorFlow is not installed", allow_module_level=True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The operations the program's OPS runs against each failing store.
OPS = ("checkpoint read", "workdir write", "workdir read", "metrics open", "metrics write")
PROGRAM = textwrap.dedent("""
    import importlib.util, io, json, os, sys
    import fsspec, numpy as np
    from tests.fake_gcs import FakeGCS, register
    from vqt_jax import cli
    from vqt_jax.checkpoints import files
    from vqt_jax import workdir
    from vqt_jax.training import metrics_io

    from etils import epath

    assert importlib.util.find_spec("tensorflow") is not None
    tf_modules = lambda: sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")
    out = {"tf_before": tf_modules(), "lines": {},
           "backend": type(epath.Path("gs://bucket")._backend).__name__}
    if out["backend"] != "_FileSystemSpecBackend":  # Not the fakes: never reach a real bucket.
        print(json.dumps(out))
        sys.exit()
    OPS = {"checkpoint read": lambda: files.read("gs://bucket/ckpt.npz"),
           "workdir write": lambda: workdir.write_results("gs://bucket/run", {"top1": 0.5}),
           "workdir read": lambda: workdir.recorded_config("gs://bucket/run"),
           "metrics open": lambda: metrics_io.create_writer("gs://bucket/run", True),
           "metrics write": lambda: WRITER.write_scalars(1, {"loss": 0.5})}

    def error_lines(kind):
        for op, fn in OPS.items():
            if op == "metrics write" and kind == "gcsfs missing":
                continue  # its writer is opened on a working store first
            try:
                fn()
                line = "no error"
            except Exception as e:
                message = cli.user_error(e)
                line = (f"error: {cli.one_line(message)}" if message is not None
                        else f"traceback: {type(e).__name__}")
            out["lines"][f"{op}, {kind}"] = line

    if importlib.util.find_spec("gcsfs") is None:  # As installed without the [gcs] extra.
        error_lines("gcsfs missing")

    try:
        from gcsfs.retry import HttpError
    except ImportError:
        class HttpError(Exception):  # gcsfs.retry.HttpError: not an OSError.
            def __init__(self, error_response):
                self.code, self.message = error_response["code"], error_response["message"]
                super().__init__(f"{self.message}, {self.code}")

    class DefaultCredentialsError(Exception):  # google.auth's: not an OSError either.
        pass

    class Store(FakeGCS):  # gs://X lands in ROOT/X, or each call raises Store.error.
        error = None

        def info(self, path, **kwargs):
            if Store.error is not None:
                raise Store.error
            return super().info(path, **kwargs)

        def exists(self, path, **kwargs):  # gcsfs's lets all but a 404 through.
            if Store.error is not None:
                raise Store.error
            return super().exists(path)

        def _open(self, path, mode="rb", **kwargs):
            if Store.error is None:
                return super()._open(path, mode, **kwargs)
            if "r" in mode:
                raise Store.error

            class Upload(io.BytesIO):  # gcsfs uploads, and fails, on close.
                def close(self):
                    if not self.closed:
                        super().close()
                        raise Store.error
            return Upload()

    register(ROOT, Store)
    WRITER = metrics_io.create_writer("gs://bucket/run", True)  # before the store fails
    with open(os.path.join(ROOT, "bucket", "ckpt.npz"), "wb") as f:
        np.savez(f, w=np.arange(6.0))
    kind, arrays = files.read("gs://bucket/ckpt.npz")
    workdir.write_results("gs://bucket/run", {"top1": 0.5})
    out["round_trip"] = [kind, arrays["w"].tolist(), workdir.read_results("gs://bucket/run")]
    for kind, error in {
        "HttpError": HttpError({"code": 401, "message": "Anonymous caller does not have "
                                "storage.objects.get access to bucket/run.\\n"}),
        "403 OSError": OSError("Forbidden: bucket/run\\ncaller lacks storage.objects.create"),
        "no credentials": DefaultCredentialsError("Could not automatically determine "
                                                  "credentials."),
    }.items():
        Store.error = error
        error_lines(kind)
    out["tf_after"] = tf_modules()
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def outcome(tmp_path_factory) -> dict:
    """What the program printed: TensorFlow modules before/after, and each `error:` line."""
    root = tmp_path_factory.mktemp("gcs")
    (root / "bucket").mkdir()
    env = {k: v for k, v in xla_env.env(None).items() if k != "EPATH_USE_TF"}
    proc = subprocess.run([sys.executable, "-c", f"ROOT = {str(root)!r}\n" + PROGRAM],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gs_paths_do_not_import_tensorflow(outcome):
    assert outcome["tf_before"] == []
    assert outcome["backend"] == "_FileSystemSpecBackend"  # tf_backend imports TensorFlow.
    assert outcome["round_trip"] == ["npz", [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], {"top1": 0.5}]
    assert outcome["tf_after"] == []


def test_a_store_failure_is_one_error_line_naming_the_path(outcome):
    lines = outcome["lines"]
    assert lines, outcome
    kinds = ["HttpError", "403 OSError", "no credentials"]
    gcsfs_missing = len(OPS) - 1 if "checkpoint read, gcsfs missing" in lines else 0
    assert len(lines) == len(OPS) * len(kinds) + gcsfs_missing
    for name, line in lines.items():
        path = "gs://bucket/ckpt.npz" if name.startswith("checkpoint") else "gs://bucket/run/"
        assert line.startswith(f"error: {path}") and "\n" not in line, (name, line)
        assert "cannot" in line and "remote file" in line, (name, line)
        if name.endswith("gcsfs missing"):
            assert "pip install -e '.[gcs]'" in line, line
    for op in OPS:
        assert "HttpError: Anonymous caller" in lines[f"{op}, HttpError"]
        assert "OSError: Forbidden" in lines[f"{op}, 403 OSError"]
        assert "DefaultCredentialsError" in lines[f"{op}, no credentials"]
