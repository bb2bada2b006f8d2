"""An S3-compatible server on loopback (moto's standalone server) for the tests and bench, and helpers to fill it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class LoopbackS3:
    """A running server: its endpoint, the settings that point clients at it, and an s3fs client."""

    endpoint: str
    env: dict[str, str]
    fs: Any

    def bucket(self, name: str) -> str:
        """Create a bucket (if absent) and return its URI."""
        if not self.fs.exists(name):
            self.fs.mkdir(name)
        return f"s3://{name}"

    def upload_tree(self, local: Path, uri: str) -> str:
        """Copy every file under the local folder ``local`` to the prefix ``uri``; return ``uri``."""
        prefix = uri.removeprefix("s3://").rstrip("/")
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            self.fs.put_file(str(path), f"{prefix}/{path.relative_to(local).as_posix()}")
        return uri

    def keys(self, uri: str) -> list[str]:
        """Return the keys below ``uri``, relative to it."""
        prefix = uri.removeprefix("s3://").rstrip("/")
        return sorted(key[len(prefix) + 1 :] for key in self.fs.find(prefix))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def loopback_s3(extra_env: dict[str, str] | None = None, read_timeout_s: int | None = None) -> Iterator[LoopbackS3]:
    """Start moto's S3 server on a free loopback port, point this process (and its children) at it, stop it at the end.

    ``read_timeout_s`` lengthens every S3 client's read timeout (60 s by default): moto takes
    minutes to assemble a multipart upload of gigabytes.
    """
    import fsspec.config
    import s3fs

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, **(extra_env or {})}
    client_options = {"config_kwargs": {"read_timeout": read_timeout_s}} if read_timeout_s else {}
    if client_options:
        env["FSSPEC_S3_CONFIG_KWARGS"] = json.dumps(client_options["config_kwargs"])
    saved = {key: os.environ.get(key) for key in env}
    saved_conf = dict(fsspec.config.conf.get("s3", {}))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on {endpoint}") from None
                time.sleep(0.2)
        os.environ.update(env)
        fsspec.config.conf.setdefault("s3", {}).update(client_options)
        s3fs.S3FileSystem.clear_instance_cache()
        yield LoopbackS3(endpoint, env, s3fs.S3FileSystem(use_listings_cache=False))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        fsspec.config.conf["s3"] = saved_conf
        s3fs.S3FileSystem.clear_instance_cache()
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
