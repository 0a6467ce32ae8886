"""Shared pieces of the service tests: an exported model, Redis on its own key prefix, test
images, a uvicorn server in a thread and a TCP proxy that can cut the line to Redis.

Plain functions (cached where costly) rather than conftest fixtures, so that the service tests
stay out of the shared conftest; each test module wraps what it needs in fixtures.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REDIS_URL = os.environ.get("DSMI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# Small request limits, so that the limit tests need small payloads only.
LIMITS = dict(max_image_bytes=300_000, max_upload_bytes=2_000_000, max_pixels=1_000_000)
TEST_PREFIX = "dsmi-test-"


# -- model ------------------------------------------------------------------------------------

@functools.cache
def exported_model_dir(variant: str = "dsmi-small", seed: int = 0) -> Path:
    """A randomly initialised ``variant`` exported for the service (once per session)."""
    import torch

    from model import build_model
    from model.export import export_model

    root = Path(tempfile.mkdtemp(prefix="dsmi-service-test-"))
    _cleanup_at_exit(root)
    torch.manual_seed(seed)
    net = build_model(variant)
    export_model(net, root / variant)
    return root / variant


def _cleanup_at_exit(path: Path) -> None:
    import atexit
    atexit.register(shutil.rmtree, path, ignore_errors=True)


@functools.cache
def service_engine(batch_size: int = 16):
    """The engine over :func:`exported_model_dir`, CPU. A small ``batch_size`` makes every
    gallery of a few dozen images span several scoring chunks."""
    from service.engine import Engine

    return Engine(exported_model_dir(), providers=["CPUExecutionProvider"],
                  batch_size=batch_size)


# -- Redis ------------------------------------------------------------------------------------

def redis_client():
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis not reachable at {REDIS_URL} ({exc}); .ci/run starts one")
    return client


def new_prefix() -> str:
    return f"{TEST_PREFIX}{uuid.uuid4().hex[:12]}:"


def delete_prefix(prefix: str) -> int:
    """Delete every key under ``prefix`` (a test's own keys only; never FLUSHDB)."""
    assert prefix.startswith(TEST_PREFIX), "tests only delete keys under their own prefix"
    client = redis_client()
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
    return len(keys)


def make_client(engine, store_kind: str, **settings):
    """An app on ``engine`` with a store of ``store_kind`` ("memory", or "redis" on a prefix
    of its own) and small limits -> (app, the Redis prefix to delete, or None)."""
    from service.app import create_app, store_namespace
    from service.settings import Settings
    from service.store import RedisGalleryStore

    store = None
    prefix = None
    if store_kind == "redis":
        redis_client()  # skips without Redis
        prefix = new_prefix()
        store = RedisGalleryStore(REDIS_URL, namespace=store_namespace(engine), prefix=prefix)
    app = create_app(Settings(**{**LIMITS, **settings}), engine=engine, store=store)
    return app, prefix


# -- images -----------------------------------------------------------------------------------

def image_bytes(seed: int = 0, size: tuple[int, int] = (48, 96), fmt: str = "JPEG",
                mode: str = "RGB", **save) -> bytes:
    """A random (seeded) image of ``size`` (W, H) encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":  # 16-bit greyscale
        img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    else:
        channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1}[mode]
        arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        img = Image.fromarray(arr.squeeze(-1) if channels == 1 else arr)
        if mode == "CMYK":  # four channels read as RGBA: relabel them as C, M, Y, K
            img = Image.frombytes("CMYK", img.size, img.tobytes())
    assert img.mode == mode, (img.mode, mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def png_header_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb:
    decoding it would allocate width * height * 3 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# -- servers ----------------------------------------------------------------------------------

class ThreadedServer:
    """A uvicorn server for ``app`` on a free local port, in a thread (real HTTP)."""

    def __init__(self, app, **config) -> None:
        import uvicorn

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", **config)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


class TcpProxy:
    """Forwards a local port to ``target``; ``stop()`` closes the listener and every open
    connection (the service sees its store vanish), ``start()`` listens again on the same
    port (the store comes back). ``hang()`` keeps every connection open but forwards nothing
    (a stopped, not dead, server: SIGSTOP), ``resume()`` forwards again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._hung = threading.Event()

    def hang(self) -> None:
        self._hung.set()

    def resume(self) -> None:
        self._hung.clear()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self._hung.is_set():  # accepted by the kernel, never answered
                with self._lock:
                    self._conns.append(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self._hung.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def dribble_body(port: int, path: str, stop: threading.Event, headers: str = "",
                 length: int = 1_000_000, every: float = 0.3) -> bytes:
    """A slow client: a multipart POST to ``path`` on loopback ``port`` whose body comes one
    byte every ``every`` seconds, until the server answers, closes, or ``stop`` is set ->
    the answer's status line (``b""`` if none). ``headers``: extra header lines, each ending
    in CRLF."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(every)
    sock.send(f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Type: multipart/form-data;"
              f" boundary=b\r\nContent-Length: {length}\r\n\r\n--b\r\n".encode())
    try:
        data = dribble(sock, lambda: not stop.is_set(), lambda got: b"\r\n\r\n" in got)
    finally:
        sock.close()
    return data.split(b"\r\n", 1)[0]


def dribble(sock: socket.socket, keep_going, answered) -> bytes:
    """Send one body byte per ``sock`` timeout while ``keep_going()`` and until
    ``answered(what came back)`` or the server closes (what it sent before is still read)
    -> what came back."""
    data = b""
    while keep_going() and not answered(data):
        try:
            sock.send(b"x")
            data += sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            try:
                data += sock.recv(65536)
            except OSError:
                pass
            break
    return data
