"""The client commands (``weightsmith submit/jobs/job/cancel/artifacts/pull``) as real
processes against a real ``weightsmith serve`` (SQLite, local artifact directory, in-process
worker) merging tiny real models.

Expected values are computed here independently: file digests with hashlib on the pulled
files and on the objects in the service's artifact directory, merged weights as the mean of
the two fine-tunes' tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.support.checkpoints import build_many_tensor_family, linear, slow, tensors
from tests.support.serve import HOLD_LIMIT_S, HeldHub, Server, free_port, write_recipe

pytestmark = pytest.mark.slow  # a server and CLI subprocesses

ROOT = Path(__file__).resolve().parent.parent
TENANT = "default"  # the bootstrap key's tenant


@pytest.fixture(scope="module")
def many_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Llama-shaped family with many tensors: a merge of it runs for seconds."""
    return build_many_tensor_family(tmp_path_factory.mktemp("many"), layers=48)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def job_id_of(stdout: str) -> str:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("submitted job "))
    return line.split()[2].rstrip(":")


def only_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("weightsmith: error: "), stderr
    return lines[0]


# -- the happy path ----------------------------------------------------------------------------


def test_submit_wait_publishes_then_jobs_artifacts_and_pull_show_and_verify_it(
    server: Server, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, "soup", linear(llama_family["ft1"], llama_family["ft2"]))

    submitted = server.cli("submit", str(recipe), "--wait")  # kind and name from the file
    assert submitted.returncode == 0, submitted.stderr + server.log.read_text()[-3000:]
    job_id = job_id_of(submitted.stdout)
    assert f"job {job_id} succeeded: published artifact://soup@1" in submitted.stdout
    # not a terminal: plain progress lines (the first poll prints one whatever the job's
    # state by then), then the outcome
    progress = [
        line
        for line in submitted.stdout.splitlines()
        if line.startswith(f"job {job_id} ") and "published artifact://" not in line
    ]
    assert progress and all(
        line.split()[2].rstrip(":") in ("queued", "running", "succeeded") for line in progress
    ), submitted.stdout

    jobs = server.cli("jobs", "--state", "succeeded")
    assert jobs.returncode == 0, jobs.stderr
    header, *rows = jobs.stdout.splitlines()
    assert header.split() == ["ID", "KIND", "STATE", "ARTIFACT", "PROGRESS", "CREATED"]
    row = next(r.split() for r in rows if r.startswith(job_id))
    assert row[1:4] == ["merge", "succeeded", "artifact://soup@1"]

    shown = server.cli("job", job_id)
    assert shown.returncode == 0, shown.stderr
    assert "state:     succeeded" in shown.stdout
    assert str(llama_family["ft1"]) in shown.stdout  # the recipe as stored

    artifacts = server.cli("artifacts")
    assert artifacts.returncode == 0, artifacts.stderr
    row = next(r.split() for r in artifacts.stdout.splitlines() if r.startswith("soup "))
    assert row[:3] == ["soup", "1", "artifact://soup@1"]
    versions = server.cli("artifacts", "soup")
    assert versions.returncode == 0, versions.stderr
    assert versions.stdout.splitlines()[1].split()[:2] == ["1", "artifact://soup@1"]

    dest = tmp_path / "pulled" / "soup"
    pulled = server.cli("pull", "artifact://soup@latest", str(dest))
    assert pulled.returncode == 0, pulled.stderr
    assert f"pulled artifact://soup@1 into {dest}" in pulled.stdout
    assert "every sha256 verified" in pulled.stdout

    stored = server.stored("soup", 1)
    manifest = json.loads((stored / "manifest.json").read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert on_disk == set(listed) | {"manifest.json"}
    for rel, entry in listed.items():
        digest = sha256(dest / rel)
        assert digest == sha256(stored / rel) == entry["sha256"], rel
        assert (dest / rel).stat().st_size == entry["size"]
    assert json.loads((dest / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in dest.parent.iterdir()) == ["soup"]  # no staging left

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dest)
    a, b = tensors(llama_family["ft1"]), tensors(llama_family["ft2"])
    merged = model.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        expected = (a[name].double() + b[name].double()) / 2
        torch.testing.assert_close(merged[name].double(), expected, atol=1e-6, rtol=0)
    ids = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False)
    assert ids.shape == (1, 6)


def test_the_same_idempotency_key_submits_once(
    server: Server, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, "once", linear(llama_family["ft1"], llama_family["ft3"]))
    first = server.cli("submit", str(recipe), "--idempotency-key", "cli-once-1")
    again = server.cli("submit", str(recipe), "--idempotency-key", "cli-once-1")
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert job_id_of(first.stdout) == job_id_of(again.stdout)


# -- failures ----------------------------------------------------------------------------------


def test_pull_of_a_tampered_artifact_fails_naming_the_file_and_leaves_nothing(
    server: Server, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    with server.client() as ws:
        job = ws.submit_job("merge", linear(llama_family["ft2"], llama_family["ft3"]), "tampered")
        job = ws.wait(job.id, timeout_s=120, interval_s=0.2)
    assert job.state == "succeeded", job.error
    stored = server.stored("tampered", 1)
    manifest = json.loads((stored / "manifest.json").read_text())
    shard = next(f["path"] for f in manifest["files"] if f["path"].endswith(".safetensors"))
    weights = stored / shard
    original = sha256(weights)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    weights.write_bytes(bytes(data))
    assert sha256(weights) != original

    dest = tmp_path / "pulls" / "tampered"
    pulled = server.cli("pull", "artifact://tampered@1", str(dest))
    assert pulled.returncode == 1
    line = only_error_line(pulled.stderr)
    assert f"'{shard}'" in line and "sha256" in line and original in line
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no staging folder either


def test_a_wrong_token_is_a_clear_401(server: Server) -> None:
    result = server.cli("jobs", token="wsk_nobody_nothing")
    assert result.returncode == 1
    line = only_error_line(result.stderr)
    assert "401" in line and "unknown or revoked" in line and "WEIGHTSMITH_TOKEN" in line


def test_global_options_override_the_environment(server: Server) -> None:
    result = server.cli(
        "--url", server.url, "--token", server.key, "jobs", url="http://127.0.0.1:9", token="x"
    )
    assert result.returncode == 0, result.stderr


def test_an_unreachable_service_is_a_clear_error(server: Server) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    result = server.cli("artifacts", url=nobody)
    assert result.returncode == 1
    line = only_error_line(result.stderr)
    assert f"cannot reach the weightsmith service at {nobody}" in line


def test_a_missing_token_is_a_clear_error(server: Server) -> None:
    env = {k: v for k, v in server.env().items() if k != "WEIGHTSMITH_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "weightsmith", "jobs"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "no API key" in only_error_line(result.stderr)


def test_422_names_the_field_pointers(
    server: Server, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, "pointers", linear(llama_family["ft1"], llama_family["ft2"]))
    bad_name = server.cli("submit", str(recipe), "--name", "Not A Name")
    assert bad_name.returncode == 2
    line = only_error_line(bad_name.stderr)
    assert "422" in line and "/artifact_name" in line

    missing = dict(linear(llama_family["ft1"], llama_family["ft2"]))
    missing["models"] = [{"model": "artifact://no-such-artifact"}, *missing["models"][1:]]
    recipe = write_recipe(tmp_path, "missing", missing)
    unknown = server.cli("submit", str(recipe))
    assert unknown.returncode == 2
    line = only_error_line(unknown.stderr)
    assert "422" in line and "/recipe/models/0/model" in line and "no-such-artifact" in line


def test_submit_infers_kind_moe_from_experts_and_waits_for_the_assembly(
    server: Server, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    experts = [
        {"source_model": str(llama_family[ft]), "positive_prompts": [words]}
        for ft, words in (("ft1", "w10 w11"), ("ft2", "w200 w201"))
    ]
    moe = {"base_model": str(llama_family["base"]), "gate_mode": "cheap_embed", "experts": experts}
    submitted = server.cli("submit", str(write_recipe(tmp_path, "two-experts", moe)), "--wait")
    assert submitted.returncode == 0, submitted.stderr + server.log.read_text()[-3000:]
    assert "succeeded: published artifact://two-experts@1" in submitted.stdout

    too_many = write_recipe(tmp_path, "too-many", {**moe, "experts_per_token": 3})
    refused = server.cli("submit", str(too_many))
    assert refused.returncode == 2
    line = only_error_line(refused.stderr)
    assert "422" in line and "experts_per_token: 3 is more than the 2 expert(s)" in line


def test_404_for_an_unknown_job_or_artifact(server: Server, tmp_path: Path) -> None:
    job = server.cli("job", "no-such-job")
    assert job.returncode == 2 and "404" in only_error_line(job.stderr)
    pulled = server.cli("pull", "artifact://no-such-thing", str(tmp_path / "never"))
    assert pulled.returncode == 2 and "no-such-thing" in only_error_line(pulled.stderr)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("merge_method: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
        ("models: []\n", "neither merge_method nor edit_method"),
    ],
)
def test_a_bad_recipe_file_is_refused_before_anything_is_sent(
    server: Server, tmp_path: Path, content: str, says: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    result = server.cli("submit", str(path), url="http://127.0.0.1:9")  # never contacted
    assert result.returncode == 2
    assert says in only_error_line(result.stderr)
    missing = server.cli("submit", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 2 and "cannot read recipe" in only_error_line(missing.stderr)


def test_submit_wait_exits_non_zero_with_the_error_of_a_failed_job(
    server: Server, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "not-a-model").mkdir()  # exists (checked at submission), holds no weights
    recipe = write_recipe(tmp_path, "broken", linear(llama_family["ft1"], tmp_path / "not-a-model"))
    result = server.cli("submit", str(recipe), "--wait")
    assert result.returncode == 1
    line = only_error_line(result.stderr)
    assert "failed:" in line and "not-a-model" in line


def test_submit_of_a_local_path_that_does_not_exist_is_refused_at_once_naming_the_field(
    server: Server, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = write_recipe(
        tmp_path, "missing", linear(llama_family["ft1"], tmp_path / "no-such-model")
    )
    result = server.cli("submit", str(recipe), "--wait")
    assert result.returncode == 2
    line = only_error_line(result.stderr)
    assert "/recipe/models/1/model" in line and "does not exist" in line


def test_cancel_stops_queued_and_running_jobs_and_submit_wait_reports_it(
    server: Server, hub_server: HeldHub, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    hub_server.add_repo("held/ft1", llama_family["ft1"])
    hub_server.add_repo("held/ft2", llama_family["ft2"])
    with server.client() as ws, hub_server.held():
        # The embedded worker runs one job at a time. The first job downloads its models from
        # the held Hub: it is running until the Hub lets go, and the next job is queued.
        running = ws.submit_job("merge", linear("held/ft1", "held/ft2"), "held")
        assert hub_server.arrived.wait(timeout=HOLD_LIMIT_S), server.log.read_text()[-3000:]
        assert ws.get_job(running.id).state == "running"

        recipe = write_recipe(tmp_path, "queued", linear(llama_family["ft1"], llama_family["ft2"]))
        waiting = subprocess.Popen(
            [sys.executable, "-m", "weightsmith", "submit", str(recipe), "--wait"],
            env=server.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert waiting.stdout is not None
            queued_id = job_id_of(waiting.stdout.readline())
            cancelled = server.cli("cancel", queued_id)
            assert cancelled.returncode == 0, cancelled.stderr
            assert cancelled.stdout.strip() == f"job {queued_id} cancelled"
            _, err = waiting.communicate(timeout=120)
        finally:
            if waiting.poll() is None:
                waiting.kill()
        assert waiting.returncode == 1
        assert f"job {queued_id} was cancelled" in only_error_line(err)

        stopped = server.cli("cancel", running.id)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.strip() == (
            f"job {running.id} is running: asked to stop (the worker stops between tensors)"
        )
    with server.client() as ws:  # the Hub lets go: the worker sees the request and stops
        final = ws.wait(running.id, timeout_s=120, interval_s=0.2)
        assert final.state == "cancelled" and final.artifact is None
        shown = server.cli("job", queued_id, "--json")
        assert json.loads(shown.stdout)["state"] == "cancelled"
        assert server.cli("cancel", queued_id).stdout.strip() == (
            f"job {queued_id} already ended cancelled; nothing to cancel"
        )
    assert not server.stored("queued", 1).exists()
    assert not server.stored("held", 1).exists()


def test_submit_wait_on_a_terminal_shows_a_progress_bar(
    server: Server, many_family: dict[str, Path], tmp_path: Path
) -> None:
    import fcntl
    import pty
    import select
    import struct
    import termios

    # a merge that runs for seconds whatever the machine's speed: several polls
    recipe = write_recipe(tmp_path, "on-a-tty", {**slow(many_family, 200), "seed": 9})
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "weightsmith", "submit", str(recipe), "--wait"],
        env=server.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    shown = b""
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the process closed the terminal
                    break
                if not data:
                    break
                shown += data
            elif process.poll() is not None:
                break
        assert process.wait(timeout=10) == 0, shown.decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    assert process.stdout is not None
    assert "succeeded: published artifact://on-a-tty@1" in process.stdout.read().decode()
    text = shown.decode(errors="replace")
    count = len(tensors(many_family["ft1"]))
    assert f"/{count} tensors" in text and "B/s" in text, text  # tqdm: tensors and bytes
    assert "\r" in text and "job " not in text  # redrawn in place, not plain lines
