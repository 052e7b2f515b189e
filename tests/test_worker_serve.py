"""``weightsmith serve``: API and in-process worker on one machine, SQLite and a local artifact
directory, no broker. A first start writes a bootstrap key that works to a private file."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.checkpoints import linear
from tests.support.serve import running_serve

pytestmark = pytest.mark.slow  # a `weightsmith serve` process, CLI subprocesses

ROOT = Path(__file__).resolve().parent.parent


def call(method: str, url: str, key: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_serve_writes_a_private_bootstrap_key_file_shows_only_its_prefix_and_runs_a_job(
    tmp_path: Path, llama_family: dict[str, Path]
) -> None:
    data = tmp_path / "data"
    with running_serve(tmp_path) as (base, log):
        key_file = data / "bootstrap-api-key"
        key = key_file.read_text().strip()
        prefix = key.split("_")[1]
        text = log.read_text()
        # stdout (container logs) names the file and the public prefix, never the secret
        assert str(key_file) in text and f"wsk_{prefix}_" in text
        assert key.split("_")[2] not in text
        # the data directory, the database and the key file are the owner's alone
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert stat.S_IMODE((data / "weightsmith.db").stat().st_mode) == 0o600
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((data / "secret-key").stat().st_mode) == 0o600

        body = {
            "kind": "merge",
            "recipe": linear(llama_family["ft1"], llama_family["ft2"]),
            "artifact_name": "served",
        }
        job = call("POST", f"{base}/v1/jobs", key, body)
        assert job["state"] == "queued"
        deadline = time.monotonic() + 60
        while job["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
            job = call("GET", f"{base}/v1/jobs/{job['id']}", key)
        assert job["state"] == "succeeded", job
        assert job["artifact"]["version"] == 1


def test_keys_create_prints_a_key_on_its_last_line_and_revoke_disables_it(tmp_path: Path) -> None:
    from infra.db import ApiKeys, make_engine

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSMITH_")},
        "WEIGHTSMITH_DATA_DIR": str(tmp_path),
        "PYTHONPATH": str(ROOT),
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "weightsmith", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    created = cli("keys", "create", "--tenant", "acme")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    engine = make_engine(f"sqlite:///{tmp_path}/weightsmith.db")
    try:
        keys = ApiKeys(engine)
        tenant = keys.authenticate(key)
        assert tenant is not None and tenant.name == "acme"

        prefix = key.split("_")[1]
        assert cli("keys", "revoke", prefix).returncode == 0
        assert keys.authenticate(key) is None
        again = cli("keys", "revoke", prefix)
        assert again.returncode == 2 and "no active API key" in again.stderr
    finally:
        engine.dispose()
