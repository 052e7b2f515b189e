"""A fuzzing campaign against the whole API, from its own OpenAPI schema (schemathesis).

Requests are generated for every operation of ``/openapi.json``, valid for the schema
("positive") or not (wrong types, missing or extra fields, strings out of pattern, …), and
sent to the app in-process (ASGI, no socket), authenticated with a real API key. Random ids
name nothing, so passes with ``known`` path values (ids of objects the caller created) and
with ``bodies`` the service accepts reach the code behind the 404s and 422s as well. Used by
tests/test_api_fuzz.py (a fixed budget in CI) and bench/api_fuzz.py (a longer campaign).

schemathesis starts the app's lifespan itself, once, the first time it calls the app.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from app.main import create_app
from infra.artifacts import MANIFEST
from infra.queue import InProcessQueue
from infra.settings import Settings
from testbed.api import MERGE_RECIPE, merge_job, publish_files

JSON = "application/json"


def fuzzed_app(folder: Path, database_url: str, hub_url: str) -> Any:
    """The app as fuzzed: the given database, artifacts under ``folder``, hub references
    pinned against ``hub_url`` (a local endpoint), webhook URLs taken as given (nothing is
    resolved, and nothing delivers in this process), jobs queued to nowhere."""
    settings = Settings(
        data_dir=folder / "data",
        database_url=database_url,
        object_store_url=f"file://{folder}/artifacts",
        broker_url=None,
        hf_endpoint=hub_url,
        hf_token=None,
        bootstrap_api_key=None,
        bootstrap_key_file=None,
        webhook_allow_private=True,
    )
    return create_app(settings, queue=InProcessQueue(lambda _job_id: None))


@dataclass
class Target:
    """A tenant's key and the objects it owns, for the fuzzer to name."""

    authorization: str
    known: dict[str, list[str]]
    bodies: dict[str, list[Any]]


def fuzz_recipe(hub: Any) -> dict[str, Any]:
    """MERGE_RECIPE on public repos of the local Hub endpoint (which the recipe's ``s3://``
    references would need a grant for); adds the repos."""
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\0" * 64}
    for name in ("base", "math", "code"):
        hub.add_repo(f"fuzz/{name}", files)
    return {
        **MERGE_RECIPE,
        "base_model": "fuzz/base",
        "models": [
            {**entry, "model": f"fuzz/{name}"}
            for entry, name in zip(MERGE_RECIPE["models"], ("math", "code"), strict=True)
        ],
    }


def prepare_tenant(app: Any, client: Any, folder: Path, hub: Any) -> Target:
    """A new tenant with a job, a webhook subscription, a schedule and a published artifact
    ``soup`` (made through the API where it can be); ``client`` calls the running app, and
    the recipes name public repos added to ``hub``."""
    tenant = f"fuzz-{uuid.uuid4().hex[:8]}"
    auth = {"Authorization": f"Bearer {app.state.service.keys.create_key(tenant)}"}
    recipe = fuzz_recipe(hub)
    job = client.post("/v1/jobs", json=merge_job(recipe), headers=auth)
    hook = client.post(
        "/v1/webhooks",
        json={"url": "http://127.0.0.1:9/hook", "events": ["job.failed"]},
        headers=auth,
    )
    schedule = client.post(
        "/v1/schedules", json={**merge_job(recipe), "cron": "0 3 * * *"}, headers=auth
    )
    for made in (job, hook, schedule):
        assert made.status_code in (201, 202), made.text
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\0" * 64}
    publish_files(app.state.service.store, tenant, "soup", files, folder)
    return Target(
        authorization=auth["Authorization"],
        known={
            "job_id": [job.json()["id"]],
            "subscription_id": [hook.json()["id"]],
            "schedule_id": [schedule.json()["id"]],
            "name": ["soup"],
            "version": ["1", "latest"],
            "path": ["config.json", MANIFEST, "model.safetensors"],
        },
        bodies={
            "POST /v1/jobs": [merge_job(recipe, name="fuzz-seeded")],
            "POST /v1/schedules": [
                {**merge_job(recipe, name="fuzz-seeded"), "cron": "*/5 * * * *"}
            ],
        },
    )


@dataclass
class Campaign:
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    per_operation: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[tuple[str, int]] = field(default_factory=Counter)  # (operation, status)
    server_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return (
            f"{self.requests} requests over {len(self.per_operation)} operations in "
            f"{self.seconds:.1f} s; statuses {statuses}; server errors {len(self.server_errors)}"
        )


def fuzz_api(
    app: Any,
    authorization: str,
    *,
    requests: int,
    seed_base: int = 0,
    known: Mapping[str, Sequence[str]] | None = None,
    bodies: Mapping[str, Sequence[Any]] | None = None,
    progress: Callable[[Campaign], None] | None = None,
) -> Campaign:
    """Send at least ``requests`` generated requests to ``app``; 5xx answers are recorded in
    ``server_errors`` (the request and the start of the body) rather than raised.

    ``known`` maps path parameter names to values that name real objects; ``bodies`` maps
    an operation ("POST /v1/jobs") to bodies it accepts.
    """
    known, bodies = known or {}, bodies or {}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    campaign = Campaign()
    start = time.perf_counter()
    round_ = 0
    while campaign.requests < requests:
        # Hypothesis stops early where a schema allows few distinct requests (/healthz):
        # rounds with new seeds go on until the budget is spent.
        passes: list[tuple[Any, GenerationMode, dict[str, Any]]] = []
        for operation in operations:
            label = f"{operation.method.upper()} {operation.path}"
            names = re.findall(r"\{(\w+)\}", operation.path)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                passes.append((operation, mode, {}))
                # a DELETE of a known object would leave the other passes nothing to name
                if names and all(known.get(n) for n in names) and operation.method != "delete":
                    fixed = {n: known[n][round_ % len(known[n])] for n in names}
                    passes.append((operation, mode, {"path_parameters": fixed}))
            for body in bodies.get(label, ()):
                passes.append(
                    (operation, GenerationMode.POSITIVE, {"body": body, "media_type": JSON})
                )
        examples = max(3, -(-(requests - campaign.requests) // len(passes)))
        for operation, mode, fixed in passes:
            _run(operation, mode, fixed, examples, seed_base + round_, authorization, campaign)
        round_ += 1
        campaign.seconds = time.perf_counter() - start
        if progress is not None:
            progress(campaign)
    campaign.seconds = time.perf_counter() - start
    return campaign


def _run(
    operation: Any,
    mode: GenerationMode,
    fixed: dict[str, Any],
    examples: int,
    seed_value: int,
    authorization: str,
    campaign: Campaign,
) -> None:
    label = f"{operation.method.upper()} {operation.path}"

    @seed(seed_value)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(case=operation.as_strategy(generation_mode=mode, **fixed))
    def send(case: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": authorization}
        response = case.call()
        campaign.requests += 1
        campaign.statuses[response.status_code] += 1
        campaign.per_operation[label] += 1
        campaign.outcomes[label, response.status_code] += 1
        if response.status_code >= 500:
            campaign.server_errors.append(
                f"{label} → {response.status_code}: {case.as_curl_command()}\n"
                f"  {response.text[:300]}"
            )

    with suppress(Unsatisfiable):  # nothing to make invalid (no parameters, no body)
        send()
