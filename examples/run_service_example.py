"""End-to-end example of the service on its embedded default (``make example``), offline.

Builds a tiny Llama and two fine-tunes, starts a plain ``weightsmith serve`` (SQLite, a
local artifact directory, the in-process worker; no setting changed) on a free port, and
then, with the bootstrap API key and the Python client: pushes the three model folders as
artifacts (a plain ``serve`` refuses local paths in recipes), submits the TIES recipe of
examples/ties.yaml — the same merge as ``make example-cli`` — with its model paths replaced
by those artifacts, follows the job, downloads the published version (every sha256
checked), and lets the merged model continue a prompt. Takes about a minute.

    python -m examples.run_service_example [--workdir .example]
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from examples.tiny_models import PROMPT, continue_text, prepare_workdir
from weightsmith.client import Client, job_artifact_reference

RECIPE = Path(__file__).resolve().parent / "ties.yaml"  # the one recipe of both examples
FAMILY = ("base", "math", "code")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    work = prepare_workdir(__doc__)
    port = _free_port()
    # A plain embedded default: no WEIGHTSMITH_* setting but where its data goes.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSMITH_")}
    env["WEIGHTSMITH_DATA_DIR"] = str(work / "service")
    print(f"$ weightsmith serve --port {port}   (embedded default: SQLite, local artifacts)")
    log = (work / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "weightsmith", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(url, work, server)
        key = (work / "service" / "bootstrap-api-key").read_text().strip()
        print(f"server up; bootstrap key {key[:15]}… (from {work}/service/bootstrap-api-key)")
        with Client(url, key) as ws:
            return _run(ws, work)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _wait_until_up(url: str, work: Path, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None:
            print((work / "serve.log").read_text())
            raise SystemExit("the server exited during start-up (log above)")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the server did not answer /healthz within 120 s")
        time.sleep(0.3)


def _run(ws: Client, work: Path) -> int:
    pushed: dict[str, str] = {}
    for name in FAMILY:
        folder = work / "models" / name
        version = ws.upload(folder, f"tiny-{name}")  # = weightsmith push FOLDER tiny-NAME
        pushed[f"./models/{name}"] = version.reference
        print(f"pushed {folder} as {version.reference}")

    recipe = on_the_service(yaml.safe_load(RECIPE.read_text()), pushed)
    job = ws.submit_job("merge", recipe, "tiny-ties")
    print(f"submitted {RECIPE.name} (its models: the artifacts above): job {job.id} {job.state}")

    def show(j: Any) -> None:
        p = j.progress
        tensors = f" {p.tensors_done}/{p.tensors_total} tensors" if p.tensors_total else ""
        print(f"  {j.state:9} {p.phase or '-'}{tensors}")

    job = ws.wait(job.id, on_progress=show, interval_s=0.5)
    if job.state != "succeeded":
        raise SystemExit(f"job ended {job.state}: {job.error}")
    reference = job_artifact_reference(job)
    print(f"published {reference}")

    dest = ws.download(str(reference), work / "downloaded")  # checks every file's sha256
    files = sum(1 for p in dest.iterdir() if p.name != "manifest.json")
    print(f"downloaded {files} files to {dest}, every sha256 verified")
    print(f"merged model continues {PROMPT!r}: {continue_text(dest)!r}")
    return 0


def on_the_service(recipe: dict[str, Any], pushed: dict[str, str]) -> dict[str, Any]:
    """The recipe with each local model path replaced by the artifact pushed from it."""

    def swap(path: str) -> str:
        if path not in pushed:
            raise SystemExit(f"{RECIPE.name} names {path!r}, which the example did not push")
        return pushed[path]

    out = dict(recipe)
    if "base_model" in out:
        out["base_model"] = swap(out["base_model"])
    out["models"] = [{**m, "model": swap(m["model"])} for m in out["models"]]
    return out


if __name__ == "__main__":
    sys.exit(main())
