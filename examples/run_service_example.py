"""End-to-end example of the service on its embedded default (no external servers).

Builds a tiny Llama and two fine-tunes, starts ``weightsmith serve`` (SQLite, a local
artifact directory, the in-process worker) on a free port, submits a TIES merge job over
HTTP with the bootstrap API key, follows its progress, downloads the published artifact,
checks every file's sha256 against the manifest, then loads the merge in transformers and
generates. Runs offline in about a minute.

    python -m examples.run_service_example [--workdir .example]
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from examples.run_example import prepare_workdir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Client:
    def __init__(self, base: str, key: str | None = None) -> None:
        self.base = base
        self.key = key

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def json(self, method: str, path: str, body: Any = None) -> Any:
        status, raw = self.request(method, path, body)
        if status >= 400:
            raise SystemExit(f"{method} {path} → {status}: {raw.decode()}")
        return json.loads(raw)


def main() -> int:
    work = prepare_workdir(__doc__)

    port = _free_port()
    env = {
        **os.environ,
        "WEIGHTSMITH_DATA_DIR": str(work / "service"),
        # the example's inputs are local directories; a production server keeps this off
        "WEIGHTSMITH_ALLOW_LOCAL_PATHS": "true",
    }
    env.pop("WEIGHTSMITH_BROKER_URL", None)
    env.pop("WEIGHTSMITH_DATABASE_URL", None)
    env.pop("WEIGHTSMITH_OBJECT_STORE_URL", None)
    print(f"$ weightsmith serve --port {port}   (embedded default: SQLite, local artifacts)")
    log = (work / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "weightsmith", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        return _run(Client(f"http://127.0.0.1:{port}"), work, server)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _run(client: Client, work: Path, server: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None:
            print((work / "serve.log").read_text())
            raise SystemExit("the server exited during start-up (log above)")
        try:
            if client.request("GET", "/healthz")[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the server did not answer /healthz within 120 s")
        time.sleep(0.3)
    client.key = (work / "service" / "bootstrap-api-key").read_text().strip()
    print(f"server up; bootstrap key {client.key[:15]}… (from {work}/service/bootstrap-api-key)")

    models = work / "models"
    job = client.json(
        "POST",
        "/v1/jobs",
        {
            "kind": "merge",
            "artifact_name": "tiny-ties",
            "recipe": {
                "merge_method": "ties",
                "base_model": str(models / "base"),
                "models": [
                    {"model": str(models / "math"), "parameters": {"weight": 1.0, "density": 0.5}},
                    {"model": str(models / "code"), "parameters": {"weight": 0.7, "density": 0.5}},
                ],
                "dtype": "bfloat16",
                "seed": 7,
            },
        },
    )
    print(f"POST /v1/jobs → {job['state']} job {job['id']}")
    while job["state"] in ("queued", "running"):
        time.sleep(0.5)
        job = client.json("GET", f"/v1/jobs/{job['id']}")
        p = job.get("progress") or {}
        print(
            f"  {job['state']:9} {p.get('phase') or '':10} "
            f"{p.get('tensors_done') or 0}/{p.get('tensors_total') or 0} tensors"
        )
    if job["state"] != "succeeded":
        raise SystemExit(f"job ended {job['state']}: {json.dumps(job.get('error'))}")
    art = job["artifact"]
    print(f"published {art['uri']}")

    manifest = client.json("GET", f"/v1/artifacts/{art['name']}/versions/{art['version']}")
    dest = work / "downloaded"
    dest.mkdir()
    for f in manifest["files"]:
        status, raw = client.request(
            "GET", f"/v1/artifacts/{art['name']}/versions/{art['version']}/files/{f['path']}"
        )
        if status != 200 or hashlib.sha256(raw).hexdigest() != f["sha256"]:
            raise SystemExit(f"{f['path']}: download failed or sha256 differs")
        (dest / f["path"]).write_bytes(raw)
    print(f"downloaded {len(manifest['files'])} files to {dest}, every sha256 verified")

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dest)
    ids = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=5, do_sample=False)
    print("merged model generates:", ids.tolist()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
