"""A fake gs:// object store for processes the tests start: fsspec's local file system rooted
in a directory, registered for the gs and gcs protocols (what etils.epath uses without
TensorFlow, and gcsfs otherwise provides). Nothing reaches the network."""

from __future__ import annotations

import fsspec
from fsspec.implementations.local import LocalFileSystem


class FakeGCS(LocalFileSystem):
    """gs://X lands in `root`/X."""

    protocol = ("gs", "gcs")
    root = ""

    def __init__(self, finalize_on_close=True, **kwargs):  # gcsfs's argument, unused here
        super().__init__(auto_mkdir=True, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith(("gs://", "gcs://")):
            path = cls.root + "/" + path.split("://", 1)[1]
        return LocalFileSystem._strip_protocol(path)


def register(root: str, store: type[FakeGCS] = FakeGCS) -> None:
    """Serves gs:// and gcs:// from `root` with `store` (FakeGCS or a subclass)."""
    store.root = root
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, store, clobber=True)
