"""``weightsmith serve`` as a real process for the CLI and client tests: start it on a free
loopback port, talk to it through the CLI, and hold a Hub download to keep a job running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from testbed.hub import HubServer
from weightsmith.client import Client

ROOT = Path(__file__).resolve().parent.parent.parent
TENANT = "default"  # the bootstrap key's tenant


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_serve(
    workdir: Path, *, timeout: float = 60, env: Mapping[str, str] | None = None
) -> Iterator[tuple[str, Path]]:
    """``weightsmith serve`` in a subprocess (data under ``workdir/data``, local paths allowed,
    ``env`` added to its environment), up and answering /healthz; yields its URL and its log
    file, and stops it after. ``timeout`` bounds the start only."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSMITH_")},
        "WEIGHTSMITH_DATA_DIR": str(workdir / "data"),
        "WEIGHTSMITH_ALLOW_LOCAL_PATHS": "true",
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    log = workdir / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "weightsmith", "serve", "--port", str(port)],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=1).close()
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        yield url, log
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class Server:
    url: str
    key: str
    data_dir: Path
    log: Path

    def cli(
        self, *args: str, url: str | None = None, token: str | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "weightsmith", *args],
            env=self.env(url, token),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=180,
        )

    def env(self, url: str | None = None, token: str | None = None) -> dict[str, str]:
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSMITH_")},
            "WEIGHTSMITH_URL": url or self.url,
            "WEIGHTSMITH_TOKEN": token or self.key,
            "PYTHONPATH": str(ROOT),
        }

    def client(self) -> Client:
        return Client(self.url, self.key)

    def stored(self, name: str, version: int) -> Path:
        """The version's folder in the service's local object store."""
        return self.data_dir / "artifacts" / TENANT / name / f"v{version}"


class HeldHub(HubServer):
    """A Hub whose file downloads wait while it is held: a job fetching a model from it stays
    running, deterministically, until the test lets it go (no sleeps, no race with the
    worker). ``arrived`` is set once a download waits."""

    def __init__(self) -> None:
        super().__init__()
        self.open = threading.Event()
        self.open.set()
        self.arrived = threading.Event()

    @contextmanager
    def held(self) -> Iterator[None]:
        self.arrived.clear()
        self.open.clear()
        try:
            yield
        finally:
            self.open.set()

    def _injected_failure(self, path: str) -> int | None:
        if "/resolve/" in path and not self.open.is_set():
            self.arrived.set()
            self.open.wait(timeout=HOLD_LIMIT_S)
        return super()._injected_failure(path)


HOLD_LIMIT_S = 600  # only a failing test holds this long; the Hub client waits as long
HUB_ENV = {
    # the held download must outlast the test's steps however loaded the machine is
    "HF_HUB_DOWNLOAD_TIMEOUT": str(HOLD_LIMIT_S),
    "HF_HUB_ETAG_TIMEOUT": str(HOLD_LIMIT_S),
    "HF_HUB_DISABLE_XET": "1",  # the test Hub speaks Git LFS only
    "HF_HUB_OFFLINE": "0",
}


def write_recipe(folder: Path, name: str, recipe: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
