"""The whole API under generated requests (schemathesis, from its own /openapi.json): no
request makes a server error, and the service still works afterwards.

The app runs in-process on SQLite with a local Hub endpoint (see testbed/fuzzing.py for
the settings and the objects made first, so that part of the requests name things that
exist). bench/api_fuzz.py runs longer campaigns, on PostgreSQL too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from schemathesis.python import asgi

from testbed.fuzzing import fuzz_api, fuzzed_app, prepare_tenant
from testbed.hub import HubServer

pytestmark = pytest.mark.slow  # a campaign of thousands of requests

FUZZ_REQUESTS = 2000


@pytest.fixture
def app(tmp_path: Path, hub: HubServer) -> Iterator[Any]:
    yield fuzzed_app(tmp_path, f"sqlite:///{tmp_path}/jobs.db", hub.url)
    asgi.shutdown_lifespans()  # schemathesis started the app, for the process


def test_generated_requests_to_every_route_never_get_a_server_error(
    app: Any, tmp_path: Path, hub: HubServer
) -> None:
    with asgi.get_client(app) as client:  # starts the app (migrations, bootstrap)
        target = prepare_tenant(app, client, tmp_path / "published", hub)
        campaign = fuzz_api(
            app,
            target.authorization,
            requests=FUZZ_REQUESTS,
            known=target.known,
            bodies=target.bodies,
        )
        print(campaign.summary())  # pytest -s shows it
        assert campaign.requests >= FUZZ_REQUESTS
        assert campaign.server_errors == [], "\n".join(campaign.server_errors[:5])
        # the requests reached past validation too, not only its refusals
        assert {200, 201, 202, 404, 422} <= set(campaign.statuses)

        auth = {"Authorization": target.authorization}
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        body = {**target.bodies["POST /v1/jobs"][0], "artifact_name": "after-fuzz"}
        after = client.post("/v1/jobs", json=body, headers=auth)
        assert after.status_code == 202, after.text
        job = client.get(f"/v1/jobs/{after.json()['id']}", headers=auth)
        assert job.json()["state"] == "queued"
        # the objects the campaign named are still there, and can be deleted
        for kind, name in (("schedules", "schedule_id"), ("webhooks", "subscription_id")):
            path = f"/v1/{kind}/{target.known[name][0]}"
            assert client.delete(path, headers=auth).status_code == 204
