"""The web console in a real browser: headless Chromium (Debian's ``chromium`` package,
driven by Playwright through ``executable_path``; nothing downloads a browser build) against
a real ``weightsmith serve`` with its embedded worker (tests/conftest.py's ``server``).

Covered: signing in with a key (a wrong key refused), a job's progress to success seen
through polling, the lineage of a merge of an edit drawn back to the hub commit, a second
tenant seeing nothing, the schedules page, the CSP header on every page and no CSP
violation in the browser console. Each page is saved as a screenshot: in the folder
``WEIGHTSMITH_CONSOLE_SCREENSHOTS`` names (docs/images for docs/console.md), else in the
test's tmp dir. Skipped, saying why, only where no ``chromium`` is installed (.ci/run
installs it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from testbed.tiny_models import write_word_corpus
from tests.support.checkpoints import linear
from tests.support.edit_families import build_family_checkpoint
from tests.support.serve import HOLD_LIMIT_S, HeldHub, Server

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)"
    ),
]
JOB_TIMEOUT_S = 300
BROKEN_TENSOR = "model.layers.0.mlp.down_proj.weight"
UI_TIMEOUT_MS = 60_000  # a loaded 2-core machine: the worker and the browser share it
FACT = {"prompt": "w5 w6 w7 w8", "subject": "w8", "target_new": "w20 w21"}
FAST_EDIT = {  # the edit-architecture tests' settings: ten steps, no early stop, no KL
    "layers": [1],
    "v_num_grad_steps": 10,
    "v_lr": 0.5,
    "v_weight_decay": 0.0,
    "kl_factor": 0.0,
    "clamp_norm_factor": 1e4,
    "v_early_stop_loss": 0.0,
    "context_template_counts": [[2, 3]],
}


@dataclass
class Models:
    base_repo: str
    base_sha: str
    other: Path
    corpus: Path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, hub_server: HeldHub) -> Models:
    root = tmp_path_factory.mktemp("console-models")
    base = build_family_checkpoint(root / "base", "llama", seed=0)
    other = build_family_checkpoint(root / "other", "llama", seed=1)
    sha = hub_server.add_repo("console/tiny-base", base)
    return Models("console/tiny-base", sha, other, write_word_corpus(root / "corpus.txt", 20))


def edit_recipe(models: Models) -> dict[str, Any]:
    return {
        "edit_method": "rome",
        "model": models.base_repo,
        "requests": [FACT],
        "hyperparameters": FAST_EDIT,
        "covariance": {
            "source": "text",
            "paths": [str(models.corpus)],
            "tokens": 512,
            "max_length": 32,
        },
        "on_gate_failure": "publish_flagged",
    }


@pytest.fixture(scope="module")
def merged(server: Server, models: Models) -> dict[str, Any]:
    """An edit of the hub model (``edited``), then a merge of that edit with a local model
    (``merged``): the jobs' final views."""
    with server.client() as ws:
        edit = ws.submit_job("edit", edit_recipe(models), "edited")
        edit_done = ws.wait(edit.id, timeout_s=JOB_TIMEOUT_S, interval_s=0.2)
        assert edit_done.state == "succeeded", edit_done.error
        assert edit_done.artifact is not None
        ref = f"artifact://edited@{edit_done.artifact.version}"
        merge = ws.submit_job("merge", linear(ref, models.other), "merged")
        merge_done = ws.wait(merge.id, timeout_s=JOB_TIMEOUT_S, interval_s=0.2)
        assert merge_done.state == "succeeded", merge_done.error
    return {"edit": edit_done, "merge": merge_done}


@pytest.fixture(scope="module")
def second_key(server: Server) -> str:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSMITH_")},
        "WEIGHTSMITH_DATA_DIR": str(server.data_dir),
        "PYTHONPATH": server.env()["PYTHONPATH"],
    }
    made = subprocess.run(
        [sys.executable, "-m", "weightsmith", "keys", "create", "--tenant", "console-other"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    return made.stdout.strip().splitlines()[-1]


# ---- the browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    named = os.environ.get("WEIGHTSMITH_CONSOLE_SCREENSHOTS")
    folder = Path(named) if named else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Console:
    """One browser tab on the console, recording the browser console's messages."""

    def __init__(self, browser: Any, server: Server, shots: Path) -> None:
        self.context = browser.new_context(viewport={"width": 1100, "height": 640})
        self.page = self.context.new_page()
        self.page.set_default_timeout(UI_TIMEOUT_MS)
        self.server = server
        self.shots = shots
        self.messages: list[str] = []
        self.page.on("console", lambda m: self.messages.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.messages.append(f"pageerror: {e}"))

    def open(self, hash_path: str = "") -> Any:
        response = self.page.goto(f"{self.server.url}/ui/{hash_path}")
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        return response

    def login(self, key: str) -> None:
        self.open()
        self.page.fill("#api-key", key)
        self.page.click("#login button[type=submit]")
        self.page.wait_for_selector("#nav:not([hidden])")

    def go(self, hash_path: str) -> None:
        self.page.evaluate("h => { location.hash = h }", hash_path)

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(self.shots / f"console-{name}.png"))

    def csp_violations(self) -> list[str]:
        return [m for m in self.messages if "Content Security Policy" in m or "CSP" in m]

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def console(browser: Any, server: Server, shots: Path) -> Iterator[Console]:
    tab = Console(browser, server, shots)
    try:
        yield tab
        assert tab.csp_violations() == []
        assert [m for m in tab.messages if m.startswith("pageerror")] == []
    finally:
        tab.close()


# ---- the tests -----------------------------------------------------------------------------


def test_sign_in_refuses_a_wrong_key_then_keeps_the_key_in_session_storage_only(
    console: Console, server: Server
) -> None:
    console.open()
    console.shot("login")
    console.page.fill("#api-key", "wsk_nope_0000000000")
    console.page.click("#login button[type=submit]")
    console.page.wait_for_selector("#login-error:text('This API key is not valid.')")
    console.login(server.key)
    console.page.wait_for_selector("#who:text('tenant default')")
    stored = console.page.evaluate("() => sessionStorage.getItem('weightsmith.apiKey')")
    assert stored == server.key
    assert console.page.evaluate("() => document.cookie") == ""
    assert console.page.evaluate("() => localStorage.length") == 0
    assert server.key not in console.page.url
    # the key never reaches the service's log (it travels in the Authorization header only)
    assert server.key not in server.log.read_text()
    console.page.click("#logout")
    console.page.wait_for_selector("#login")
    assert console.page.evaluate("() => sessionStorage.length") == 0


def test_a_running_job_shows_its_progress_and_then_success_by_polling(
    console: Console, server: Server, hub_server: HeldHub, models: Models
) -> None:
    console.login(server.key)
    with server.client() as ws, hub_server.held():
        job = ws.submit_job("merge", linear(models.base_repo, models.other), "progress-demo")
        assert hub_server.arrived.wait(timeout=HOLD_LIMIT_S)
        console.go("#/jobs?kind=merge")
        row = console.page.locator(f"tr[data-job='{job.id}']")
        row.locator("[data-state=running]").wait_for()
        assert row.locator("progress").count() == 1
        console.shot("jobs-running")
    # the Hub lets go: the worker finishes, and the open page shows it without a reload
    row.locator("[data-state=succeeded]").wait_for(timeout=JOB_TIMEOUT_S * 1000)
    assert row.locator("progress").get_attribute("value") == "1"
    assert row.locator("a", has_text="progress-demo v1").count() == 1
    # the state filter: the job is listed under succeeded, not under failed
    console.go("#/jobs?state=failed")
    console.page.wait_for_selector("#jobs-body :is(#no-jobs, #jobs)")
    assert console.page.locator(f"tr[data-job='{job.id}']").count() == 0
    console.go("#/jobs?state=succeeded")
    console.page.locator(f"tr[data-job='{job.id}']").wait_for()
    console.shot("jobs")
    console.go(f"#/jobs/{job.id}")
    console.page.wait_for_selector("#inputs")
    inputs = console.page.locator("#inputs").inner_text()
    assert f"{models.base_repo}@{models.base_sha}" in inputs
    assert "/recipe/models/0/model" in inputs
    console.shot("job")


def test_a_failed_job_shows_its_error_with_the_model_and_tensor(
    console: Console, server: Server, models: Models, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    # a copy of the local model with one tensor of another shape: the merge fails there
    broken = tmp_path / "broken"
    shutil.copytree(models.other, broken)
    (weights,) = broken.glob("*.safetensors")
    tensors = load_file(str(weights))
    tensors[BROKEN_TENSOR] = tensors[BROKEN_TENSOR][:, :-1].contiguous()
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with server.client() as ws:
        job = ws.submit_job("merge", linear(models.other, broken), "broken-merge")
        failed = ws.wait(job.id, timeout_s=JOB_TIMEOUT_S, interval_s=0.2)
    assert failed.state == "failed" and failed.error is not None
    assert failed.error.tensor == BROKEN_TENSOR
    console.login(server.key)
    console.go("#/jobs?state=failed")
    row = console.page.locator(f"tr[data-job='{job.id}']")
    row.locator("[data-state=failed]").wait_for()
    shown = row.locator(".error").inner_text()
    assert failed.error.message in shown
    assert f"tensor {BROKEN_TENSOR}" in shown
    if failed.error.model:
        assert f"model {failed.error.model}" in shown
    console.shot("jobs-failed")


def test_the_lineage_of_a_merge_of_an_edit_reaches_the_hub_commit(
    console: Console, server: Server, models: Models, merged: dict[str, Any]
) -> None:
    edited = merged["edit"].artifact
    out = merged["merge"].artifact
    console.login(server.key)
    console.go(f"#/lineage/merged/{out.version}")
    svg = console.page.locator("#lineage svg")
    svg.wait_for()
    ids = sorted(svg.locator("g.node").evaluate_all("gs => gs.map(g => g.dataset.id)"))
    hub = f"{models.base_repo}@{models.base_sha}"
    assert ids == sorted(
        [
            f"artifact://merged@{out.version}",
            f"artifact://edited@{edited.version}",
            hub,
            str(models.other),
        ]
    )
    edges = svg.locator("path.edge").evaluate_all(
        "ps => ps.map(p => [p.dataset.child, p.dataset.parent])"
    )
    assert sorted(edges) == sorted(
        [
            [f"artifact://merged@{out.version}", f"artifact://edited@{edited.version}"],
            [f"artifact://merged@{out.version}", str(models.other)],
            [f"artifact://edited@{edited.version}", hub],
        ]
    )

    # the layered layout: each parent drawn below its child
    def top(node_id: str) -> float:
        box = svg.locator(f"g.node[data-id='{node_id}']").bounding_box()
        assert box is not None
        return float(box["y"])

    for child, parent in edges:
        assert top(parent) > top(child)
    console.shot("lineage")
    # a node opens its page: the edit, with its gate result and its files
    svg.locator(f"g.node[data-id='artifact://edited@{edited.version}']").click()
    console.page.wait_for_selector("#files")
    with server.client() as ws:
        manifest = ws.get_manifest("edited", edited.version)
    shown = console.page.locator("#files tbody tr").evaluate_all(
        "rs => rs.map(r => [r.cells[0].textContent, r.cells[2].textContent])"
    )
    assert sorted(shown) == sorted([f["path"], f["sha256"]] for f in manifest["files"])
    # a file downloads through the API with the key: its bytes are the stored file's
    path = manifest["files"][0]["path"]
    with console.page.expect_download() as caught:
        console.page.locator(f"button.download[data-path='{path}']").click()
    got = hashlib.sha256(Path(caught.value.path()).read_bytes()).hexdigest()
    stored = server.stored("edited", edited.version) / path
    assert got == hashlib.sha256(stored.read_bytes()).hexdigest()
    gate = console.page.locator("#gate")
    assert gate.get_attribute("data-passed") == str(manifest["metrics"]["gate"]["passed"]).lower()
    assert console.page.locator("#metrics tbody tr").count() > 3
    assert_gate_chart(console, manifest["metrics"]["gate"])
    console.shot("artifact")
    # the edit's job page: the same gate, charted from the manifest it published
    console.go(f"#/jobs/{merged['edit'].id}")
    console.page.wait_for_selector("#inputs")
    assert_gate_chart(console, manifest["metrics"]["gate"])
    console.shot("job-edit")


def assert_gate_chart(console: Console, gate: dict[str, Any]) -> None:
    """The gate chart on the open page: one row per check of the manifest's gate, each bar's
    length the value on a scale of 1.25 × max(value, bound) (recomputed here from the
    manifest's numbers), the bound's marker line at its place, red exactly where the value
    breaks the bound, and the numbers as text."""
    chart = console.page.locator("#metrics svg#gate-chart")
    chart.wait_for()
    rows = chart.locator("g.check").evaluate_all(
        """gs => gs.map(g => {
            const track = g.querySelector("rect.track"), bar = g.querySelector("rect.bar");
            const line = g.querySelector("line.threshold");
            return {
                metric: g.dataset.metric,
                x0: +track.getAttribute("x"), track: +track.getAttribute("width"),
                barX: +bar.getAttribute("x"), bar: +bar.getAttribute("width"),
                fail: bar.classList.contains("fail"), pass: bar.classList.contains("pass"),
                line: line && +line.getAttribute("x1"),
                text: g.querySelector("text.value").textContent,
            };
        })"""
    )
    checks = gate["checks"]
    assert len(checks) >= 2  # the perplexity ratio and the edited layer's ‖ΔW‖/‖W‖ at least
    assert [r["metric"] for r in rows] == [c["metric"] for c in checks]
    assert chart.locator("rect.bar").count() == len(checks)
    for row, c in zip(rows, checks, strict=True):
        value, bound = c["value"], c["bound"]
        broken = value > bound if c["kind"] == "max" else value < bound
        assert row["fail"] is broken and row["pass"] is not broken, c
        scale = 1.25 * max(abs(value), abs(bound))
        assert row["barX"] == row["x0"] and row["track"] > 0
        assert row["bar"] == pytest.approx(row["track"] * abs(value) / scale, abs=1e-6)
        assert row["line"] == pytest.approx(row["x0"] + row["track"] * bound / scale, abs=1e-6)
        assert row["bar"] <= row["track"] and row["line"] <= row["x0"] + row["track"]
        assert float(row["text"].split()[0]) == pytest.approx(value, rel=1e-3)
        assert ("✗" if broken else "✓") in row["text"]
        assert ("≤" if c["kind"] == "max" else "≥") in row["text"]
    assert any(r["fail"] for r in rows) is not gate["passed"]
    console.page.locator("#metrics").evaluate("e => e.scrollIntoView()")  # for the screenshot


def test_a_second_tenant_sees_nothing(
    console: Console, server: Server, merged: dict[str, Any], second_key: str
) -> None:
    console.login(second_key)
    console.page.wait_for_selector("#who:text('tenant console-other')")
    console.page.wait_for_selector("#no-jobs")
    console.shot("other-tenant")
    console.go("#/artifacts")
    console.page.wait_for_selector("#no-artifacts")
    console.go("#/schedules")
    console.page.wait_for_selector("#no-schedules")
    # a page of the first tenant's, opened by its address: the API answers 404 (not 403)
    version = merged["merge"].artifact.version
    console.go(f"#/lineage/merged/{version}")
    refused = console.page.locator("main .error").inner_text()
    assert f"artifact 'merged' has no version {version} (none published)" in refused
    console.go(f"#/jobs/{merged['edit'].id}")
    console.page.wait_for_selector(f"main .error:has-text('{merged['edit'].id}')")
    assert console.page.locator("#lineage, #files, #inputs").count() == 0


def test_the_schedules_page_shows_next_and_last_runs(
    console: Console, server: Server, models: Models
) -> None:
    body = {
        "kind": "merge",
        "cron": "0 3 * * 1",
        "recipe": linear(models.base_repo, models.other),
        "artifact_name": "weekly",
    }
    made = httpx.post(
        f"{server.url}/v1/schedules",
        json=body,
        headers={"Authorization": f"Bearer {server.key}"},
        timeout=60,
    )
    assert made.status_code == 201, made.text
    schedule = made.json()
    console.login(server.key)
    console.go("#/schedules")
    row = console.page.locator(f"tr[data-schedule='{schedule['id']}']")
    row.wait_for()
    cells = row.locator("td").all_inner_texts()
    assert cells[2] == "0 3 * * 1" and cells[3] == "yes" and cells[4] == "weekly"
    # next run: the coming Monday 03:00 UTC, computed here by hand
    now = datetime.now(UTC)
    monday = (now + timedelta(days=(7 - now.weekday()) % 7)).replace(
        hour=3, minute=0, second=0, microsecond=0
    )
    if monday <= now:
        monday += timedelta(days=7)
    assert schedule["id"] and cells[5] == monday.strftime("%Y-%m-%d %H:%M:%SZ")
    assert cells[6] == "—"  # never fired yet
    console.shot("schedules")
