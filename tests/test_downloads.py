"""http(s) checkpoint downloads: only complete checkpoints enter the cache, stalls fail fast.

Every test talks to a threaded HTTP server on 127.0.0.1 (an ephemeral port) that misbehaves on
purpose; nothing reaches the network. `serve` and the handler makers below are plain functions
so other test files can reuse them:

    with serve(send(data)) as url:
        files.read(url + "/vit.npz")
"""

from __future__ import annotations

import contextlib
import errno
import functools
import http.server
import io
import os
import pathlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from vqt_jax.checkpoints import CheckpointError, files
from vqt_jax.progress import Progress

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "golden"
NPZ = (GOLDEN / "bv_vit.npz").read_bytes()
SAFETENSORS = (GOLDEN / "clip_vit.safetensors").read_bytes()

Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, handler: Handler):
        self.handler = handler
        self.hits: list[str] = []
        self.stop = threading.Event()  # set on exit: slow handlers end their loops

        class Request(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                self.server.hits.append(self.path)
                try:
                    self.server.handler(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as it should

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Request)


@contextlib.contextmanager
def serve(handler: Handler) -> Iterator[str]:
    """Serves every GET with `handler(request)`; yields the base URL (http://127.0.0.1:PORT).

    The server object is reachable as `serve.last` (its `hits` lists the paths requested).
    """
    server = _Server(handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    serve.last = server
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def send(data: bytes, content_type: str = "application/octet-stream",
         length: int | None | bool = True) -> Handler:
    """Sends `data` with HTTP 200; Content-Length: len(data) (True), `length`, or none (None)."""

    def handler(req: http.server.BaseHTTPRequestHandler) -> None:
        req.send_response(200)
        req.send_header("Content-Type", content_type)
        if length is True:
            req.send_header("Content-Length", str(len(data)))
        elif length is not None:
            req.send_header("Content-Length", str(length))
        req.end_headers()
        req.wfile.write(data)
        req.wfile.flush()
        req.close_connection = True

    return handler


def short_body(data: bytes) -> Handler:
    """Announces len(data) bytes, sends half and closes: a dropped connection."""
    return send(data[: len(data) // 2], length=len(data))


def cut_without_length(data: bytes, keep: float = 0.6) -> Handler:
    """Sends the first part of `data` with no Content-Length and closes: looks complete."""
    return send(data[: int(len(data) * keep)], length=None)


def html_page() -> Handler:
    """HTTP 200 with a login page instead of the file, as some hosts do."""
    page = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>...</body></html>"
    return send(page, content_type="text/html; charset=utf-8")


def status(code: int) -> Handler:
    def handler(req: http.server.BaseHTTPRequestHandler) -> None:
        req.send_error(code)

    return handler


def chunked_cut(data: bytes) -> Handler:
    """A chunked body that stops inside a chunk (http.client raises IncompleteRead)."""

    def handler(req: http.server.BaseHTTPRequestHandler) -> None:
        req.send_response(200)
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()
        req.wfile.write(b"%x\r\n" % len(data) + data[: len(data) // 3])
        req.wfile.flush()
        req.close_connection = True

    return handler


def paced(data: bytes, chunk: int = 1, every_s: float = 0.05, limit_s: float = 10.0) -> Handler:
    """Sends headers for all of `data`, then `chunk` bytes every `every_s` s (for <= limit_s)."""

    def handler(req: http.server.BaseHTTPRequestHandler) -> None:
        req.send_response(200)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        deadline = time.monotonic() + limit_s
        for i in range(0, len(data), chunk):
            if req.server.stop.wait(every_s) or time.monotonic() > deadline:
                break
            req.wfile.write(data[i : i + chunk])
            req.wfile.flush()
        req.close_connection = True

    return handler


def trickle(data: bytes, every_s: float = 0.05) -> Handler:
    """One byte every `every_s` seconds: the connection stays alive but the file never comes."""
    return paced(data, 1, every_s)


def silent(after_headers: bool, limit_s: float = 10.0) -> Handler:
    """Says nothing (at all, or after the headers and 16 bytes) until the client gives up."""

    def handler(req: http.server.BaseHTTPRequestHandler) -> None:
        if after_headers:
            req.send_response(200)
            req.send_header("Content-Length", str(len(NPZ)))
            req.end_headers()
            req.wfile.write(NPZ[:16])
            req.wfile.flush()
        req.server.stop.wait(limit_s)
        req.close_connection = True

    return handler


def cache_files(root: pathlib.Path) -> list[str]:
    """Every file under the cache directory (relative paths), .part files included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def cache(tmp_path, monkeypatch) -> pathlib.Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("VQT_JAX_CACHE", str(root))
    monkeypatch.setenv("VQT_JAX_DOWNLOAD_STALL_S", "1")
    # A proxy set in the environment must not see the loopback server.
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return root


# --- a good file --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bv_vit.npz", "timm_vit.pth", "clip_vit.safetensors"])
@pytest.mark.parametrize("with_length", [True, False])
def test_valid_file_is_cached_and_read_back(cache, name, with_length):
    data = (GOLDEN / name).read_bytes()
    with serve(send(data, length=True if with_length else None)) as base:
        url = f"{base}/models/{name}"
        kind, got = files.read(url)
        local = pathlib.Path(files.cache_path(url))
        assert local.read_bytes() == data
        assert cache_files(cache) == [str(local.relative_to(cache))]
        again = files.read(url)  # from the cache: the server sees one request
        assert serve.last.hits == [f"/models/{name}"]
    _, expected = files.read(str(GOLDEN / name))
    assert kind == again[0] and sorted(got) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])
        np.testing.assert_array_equal(again[1][k], expected[k])


def test_progress_lines_name_bytes_rate_and_eta(cache, monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(files, "_PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(files, "Progress", functools.partial(Progress, log=lines.append))
    with serve(paced(NPZ, chunk=32768, every_s=0.01)) as base:
        files._download(f"{base}/bv_vit.npz")
    assert len(lines) >= 2, lines
    assert re.fullmatch(rf"Downloading {base}/bv_vit.npz: \d+/{len(NPZ)} bytes \(\d+%\), "
                        r"[\d.]+ (bytes/s|s per byte)(, ETA \w+)?", lines[0]), lines[0]


# --- bad downloads: one named error, nothing cached ---------------------------------------------

BAD_DOWNLOADS: dict[str, tuple[Handler, str]] = {
    "short_body": (short_body(NPZ),
                   f"the server announced {len(NPZ)} bytes \\(Content-Length\\) but sent "
                   f"{len(NPZ) // 2}"),
    "zip_cut_without_length": (cut_without_length(NPZ),
                               "the file is incomplete: the zip archive's central "
                               "directory cannot be read"),
    "safetensors_cut_without_length": (cut_without_length(SAFETENSORS),
                                       "the file is incomplete: the safetensors header "
                                       f"describes {len(SAFETENSORS)} bytes but the file has "
                                       f"{int(len(SAFETENSORS) * 0.6)}"),
    "html_200": (html_page(),
                 "not a checkpoint: the server sent text/html; charset=utf-8, starting "
                 "b'<!DOCTYPE html><html><head><title>Sign in</title'"),
    "empty_200": (send(b""), "not a checkpoint: the server sent application/octet-stream, "
                             "starting b''"),
    "not_found": (status(404), "HTTPError: HTTP Error 404: Not Found"),
    "server_error": (status(500), "HTTPError: HTTP Error 500"),
    "chunked_cut": (chunked_cut(NPZ), "the connection failed after \\d+ bytes \\(IncompleteRead"),
}


@pytest.mark.parametrize("case", sorted(BAD_DOWNLOADS))
def test_bad_download_is_named_and_caches_nothing(cache, case):
    handler, pattern = BAD_DOWNLOADS[case]
    with serve(handler) as base:
        url = f"{base}/v/bv_vit.npz"
        with pytest.raises(CheckpointError) as e:
            files.read(url)
    msg = str(e.value)
    assert msg.startswith(f"Could not download {url}: "), msg
    assert re.search(pattern, msg), msg
    assert msg.endswith("nothing was cached"), msg
    assert "\n" not in msg
    assert cache_files(cache) == []


@pytest.mark.parametrize("case", ["trickle", "silent_body", "no_answer"])
def test_stalled_download_fails_fast(cache, case):
    handler = {
        "trickle": trickle(NPZ, every_s=0.05),  # ~20 bytes/s: alive, but hopeless
        "silent_body": silent(after_headers=True),
        "no_answer": silent(after_headers=False),
    }[case]
    start = time.monotonic()
    with serve(handler) as base:
        url = f"{base}/bv_vit.npz"
        with pytest.raises(CheckpointError) as e:
            files.read(url)
    elapsed = time.monotonic() - start
    msg = str(e.value)
    assert msg.startswith(f"Could not download {url}: the transfer stalled ("), msg
    assert re.search(r"; \d+( of \d+)? bytes arrived in all; nothing was cached", msg), msg
    if case != "no_answer":
        assert f" of {len(NPZ)} bytes arrived" in msg
    assert "VQT_JAX_DOWNLOAD_STALL_S" in msg
    assert elapsed < 6, f"took {elapsed:.1f} s with a 1 s stall limit"
    assert cache_files(cache) == []


def test_connection_refused(cache):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.npz"
    with pytest.raises(CheckpointError, match=re.escape(f"Could not download {url}: URLError")):
        files.read(url)
    assert cache_files(cache) == []


def test_bad_stall_setting_is_named(cache, monkeypatch):
    monkeypatch.setenv("VQT_JAX_DOWNLOAD_STALL_S", "soon")
    with serve(send(NPZ)) as base:
        with pytest.raises(CheckpointError, match="VQT_JAX_DOWNLOAD_STALL_S must be a positive "
                                                  "number of seconds, got 'soon'"):
            files.read(f"{base}/bv_vit.npz")
    assert cache_files(cache) == []


def test_unwritable_cache_is_named(cache, monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("VQT_JAX_CACHE", str(blocker / "cache"))  # works even as root
    with serve(send(NPZ)) as base:
        url = f"{base}/bv_vit.npz"
        with pytest.raises(CheckpointError) as e:
            files.read(url)
    assert str(e.value).startswith(
        f"Could not download {url}: cannot write to the cache directory {blocker}/cache/")
    assert "set $VQT_JAX_CACHE to a writable directory" in str(e.value)


class _FullDisk(io.FileIO):
    def write(self, b):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_removes_the_part_file(cache, monkeypatch):
    monkeypatch.setattr(files, "_open_part", lambda fd: _FullDisk(fd, "wb"))
    with serve(send(NPZ)) as base:
        url = f"{base}/bv_vit.npz"
        with pytest.raises(CheckpointError) as e:
            files.read(url)
    tmp = re.escape(os.path.dirname(files.cache_path(url)))
    assert re.fullmatch(f"no space left on device writing {tmp}/\\.bv_vit\\.npz\\.\\w+\\.part "
                        f"for {re.escape(url)}; nothing was cached .*", str(e.value)), e.value
    assert cache_files(cache) == []


def test_interrupted_download_removes_the_part_file(cache, monkeypatch):
    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "_check_complete", interrupt)
    with serve(send(NPZ)) as base:
        with pytest.raises(KeyboardInterrupt):
            files.read(f"{base}/bv_vit.npz")
    assert cache_files(cache) == []


# --- damaged cache ------------------------------------------------------------------------------


def test_damaged_cached_file_is_downloaded_again_once(cache, monkeypatch):
    warnings: list[str] = []
    monkeypatch.setattr(files.logging, "warning", lambda fmt, *a: warnings.append(fmt % a))
    with serve(send(NPZ)) as base:
        url = f"{base}/bv_vit.npz"
        files.read(url)
        local = pathlib.Path(files.cache_path(url))
        local.write_bytes(NPZ[:1000])  # truncated after the fact
        kind, flat = files.read(url)
        assert len(serve.last.hits) == 2
    assert kind == "npz" and "params/cls" in flat
    assert local.read_bytes() == NPZ
    assert len(warnings) == 1 and str(local) in warnings[0], warnings
    assert "downloading it again" in warnings[0]
    assert cache_files(cache) == [str(local.relative_to(cache))]


def _unreadable_safetensors() -> bytes:
    """Complete by its offsets, yet unreadable: a dtype the reader does not support."""
    header = b'{"w": {"dtype": "F8_E4M3FNUZ", "shape": [4], "data_offsets": [0, 4]}}'
    return len(header).to_bytes(8, "little") + header + b"\0" * 4


def test_cached_file_still_unreadable_names_it_and_says_rm(cache, monkeypatch):
    monkeypatch.setattr(files.logging, "warning", lambda *a: None)
    with serve(send(_unreadable_safetensors())) as base:
        url = f"{base}/w.safetensors"
        local = files.cache_path(url)
        # Just downloaded: no second try, the error names the cached copy.
        with pytest.raises(CheckpointError) as e:
            files.read(url)
        assert str(e.value).startswith(f"{url} (cached at {local}): tensor 'w' has dtype")
        assert str(e.value).endswith(f"the file was just downloaded (remove the cached copy "
                                     f"with: rm {local})")
        # Already cached: deleted and downloaded once more, then the same error.
        with pytest.raises(CheckpointError) as e:
            files.read(url)
        assert len(serve.last.hits) == 2
    msg = str(e.value)
    assert msg.startswith(f"{url} (cached at {local}): tensor 'w' has dtype 'F8_E4M3FNUZ'"), msg
    assert msg.endswith(f"(remove the cached copy with: rm {local})"), msg
    assert "downloaded again and still cannot be read" in msg
    assert cache_files(cache) == [os.path.relpath(local, cache)]


def test_cached_file_damaged_and_server_gone(cache, monkeypatch):
    monkeypatch.setattr(files.logging, "warning", lambda *a: None)
    with serve(send(NPZ)) as base:
        url = f"{base}/bv_vit.npz"
        files.read(url)
    local = pathlib.Path(files.cache_path(url))
    local.write_bytes(NPZ[:100])
    # The server is gone: the damaged copy is removed and the download error names the URL.
    with pytest.raises(CheckpointError, match=re.escape(f"Could not download {url}: URLError")):
        files.read(url)
    assert cache_files(cache) == []
