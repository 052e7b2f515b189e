"""The CLI in this process: its parser (help for every option, every default shown), and the
remote commands against a scripted service (httpx.MockTransport) — ``--json`` output, the
exit-code rule (2 for bad input, 1 for the rest), and the messages.

Fast: no server, no subprocess, no torch. The same commands against a real
``weightsmith serve`` are in test_cli_client.py.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import weightsmith.client
from weightsmith.cli import build_parser, main
from weightsmith.client import (
    Client,
    ClientError,
    ConfigurationError,
    DownloadError,
    DownloadTargetError,
    LocalFilesError,
    UsageError,
    parse_artifact_ref,
)

API = "http://api.test:8000"
KEY = "wsk_abc_secret"
Handler = Callable[[httpx.Request], httpx.Response]


# -- the parser --------------------------------------------------------------------------------


def parsers(parser: argparse.ArgumentParser, path: str = "weightsmith") -> Iterator[Any]:
    """(command path, parser) for the parser and every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from parsers(child, f"{path} {name}")


def test_every_option_and_argument_of_every_command_has_help() -> None:
    missing = [
        f"{path}: {action.option_strings or action.dest}"
        for path, parser in parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not (action.help or "").strip()
    ]
    assert missing == []


def test_every_default_is_shown_in_the_help() -> None:
    unshown = []
    for path, parser in parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.default in (None, False, argparse.SUPPRESS) or action.help is None:
                continue
            if not action.option_strings:
                continue
            shown = f"(default: {action.default})" in text or "(default" in action.help
            if not shown:
                unshown.append(f"{path} {action.option_strings[0]} = {action.default!r}")
    assert unshown == []
    assert "(default: 20)" in " ".join(sub_help("jobs").split())


def sub_help(command: str) -> str:
    return dict(parsers(build_parser()))[f"weightsmith {command}"].format_help()


def test_the_top_level_help_lists_every_command() -> None:
    text = build_parser().format_help()
    for command in ("merge", "edit", "serve", "worker", "submit", "jobs", "pull", "push"):
        assert f"    {command} " in text


# -- the exit-code rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "bad_input"),
    [
        (ClientError("invalid field", status=422), True),
        (ClientError("unknown job", status=404), True),
        (ClientError("body too large", status=413), True),
        (ClientError("key reused with another body", status=409), True),
        (ClientError("unknown or revoked key", status=401), False),
        (ClientError("forbidden", status=403), False),
        (ClientError("bad gateway", status=502), False),
        (ClientError("internal error", status=500), False),
        (ClientError("no answer"), False),
        (ConfigurationError("no API key"), True),
        (LocalFilesError("a pickle file"), True),
        (DownloadTargetError("target not empty"), True),
        (DownloadError("the manifest lists no files"), False),
    ],
)
def test_bad_input_is_a_4xx_other_than_401_403_or_a_usage_error(
    error: ClientError, bad_input: bool
) -> None:
    assert error.bad_input is bad_input


def test_a_malformed_artifact_reference_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="artifact"):
        parse_artifact_ref("Not A Name")


# -- remote commands against a scripted service -----------------------------------------------


def job_json(job_id: str = "j1", state: str = "queued", **extra: Any) -> dict[str, Any]:
    return {
        "id": job_id,
        "kind": "merge",
        "state": state,
        "artifact_name": "soup",
        "recipe": {"merge_method": "linear"},
        "created_at": "2025-01-01T00:00:00Z",
        "max_attempts": 3,
        **extra,
    }


def answer(status: int, body: Any) -> httpx.Response:
    return httpx.Response(status, json=body)


def problem(status: int, title: str, detail: str, **extra: Any) -> httpx.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return httpx.Response(
        status, content=json.dumps(body), headers={"content-type": "application/problem+json"}
    )


class Service:
    """Scripted answers by (method, path); records every request."""

    def __init__(self, routes: dict[tuple[str, str], httpx.Response]) -> None:
        self.routes = routes
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        found = self.routes.get((request.method, request.url.path))
        return found if found is not None else problem(404, "Not Found", "no such route")


@pytest.fixture
def run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    """``run(service, *argv)``: the CLI's exit code, stdout and stderr, with every Client
    the command makes talking to ``service``."""
    monkeypatch.setattr(weightsmith.client.time, "sleep", lambda s: None)  # no backoff pauses

    def invoke(service: Service, *argv: str) -> tuple[int, str, str]:
        def client(url: str | None, token: str | None, **kwargs: Any) -> Client:
            return Client(url, token, transport=httpx.MockTransport(service), **kwargs)

        monkeypatch.setattr(weightsmith.client, "Client", client)
        capsys.readouterr()
        code = main(["--url", API, "--token", KEY, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def test_jobs_json_prints_the_jobs_as_the_api_returns_them(run: Any) -> None:
    jobs = [job_json("j2", "running"), job_json("j1", "succeeded")]
    service = Service({("GET", "/v1/jobs"): answer(200, {"items": jobs, "next_cursor": None})})

    code, out, _ = run(service, "jobs", "--json")

    assert code == 0
    printed = json.loads(out)
    assert [j["id"] for j in printed] == ["j2", "j1"]
    assert [j["state"] for j in printed] == ["running", "succeeded"]
    assert printed[0]["recipe"] == {"merge_method": "linear"}


def test_jobs_json_of_no_jobs_is_an_empty_list(run: Any) -> None:
    service = Service({("GET", "/v1/jobs"): answer(200, {"items": []})})
    code, out, _ = run(service, "jobs", "--json", "--state", "failed")
    assert code == 0 and json.loads(out) == []
    assert service.requests[0].url.params["state"] == "failed"


def test_job_json_prints_the_job(run: Any) -> None:
    service = Service({("GET", "/v1/jobs/j7"): answer(200, job_json("j7", "failed"))})
    code, out, _ = run(service, "job", "j7", "--json")
    assert code == 0 and json.loads(out)["id"] == "j7" and json.loads(out)["state"] == "failed"


def test_artifacts_json_lists_latest_versions_or_every_version_of_one(run: Any) -> None:
    latest = [{"name": "soup", "version": 2, "reference": "artifact://soup@2"}]
    versions = [
        {"name": "soup", "version": 1, "reference": "artifact://soup@1"},
        {"name": "soup", "version": 2, "reference": "artifact://soup@2"},
    ]
    service = Service(
        {
            ("GET", "/v1/artifacts"): answer(200, {"items": latest}),
            ("GET", "/v1/artifacts/soup/versions"): answer(200, {"items": versions}),
        }
    )
    code, out, _ = run(service, "artifacts", "--json")
    assert code == 0 and [a["reference"] for a in json.loads(out)] == ["artifact://soup@2"]
    code, out, _ = run(service, "artifacts", "soup", "--json")
    assert code == 0 and [a["version"] for a in json.loads(out)] == [1, 2]


def test_tenant_json_prints_the_tenant_view(run: Any) -> None:
    view = {
        "name": "acme",
        "hub_token": {"configured": False, "used": None},
        "hub_push_namespaces": ["acme-org"],
        "s3_grants": [{"location": "s3://data/acme/", "endpoint": None}],
        "local_paths": False,
    }
    service = Service({("GET", "/v1/tenant"): answer(200, view)})
    code, out, _ = run(service, "tenant", "--json")
    assert code == 0
    assert json.loads(out)["hub_push_namespaces"] == ["acme-org"]
    assert json.loads(out)["s3_grants"][0]["location"] == "s3://data/acme/"


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("merge", "the worker stops between tensors"),
        ("edit", "the worker stops between the edit's phases and batches"),
    ],
)
def test_cancel_of_a_running_job_says_where_it_stops_for_its_kind(
    run: Any, kind: str, says: str
) -> None:
    running = job_json("j3", "running", kind=kind)
    service = Service(
        {
            ("GET", "/v1/jobs/j3"): answer(200, running),
            ("POST", "/v1/jobs/j3/cancel"): answer(200, {**running, "cancel_requested": True}),
        }
    )
    code, out, _ = run(service, "cancel", "j3")
    assert code == 0
    assert out.strip() == f"job j3 is running: asked to stop ({says})"
    if kind == "edit":
        assert "tensor" not in out


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("weightsmith: error: "), err
    return lines[0]


def test_pull_into_a_folder_that_is_not_empty_exits_2_before_asking_the_service(
    run: Any, tmp_path: Path
) -> None:
    (tmp_path / "kept.txt").write_text("mine")
    service = Service({})
    code, _, err = run(service, "pull", "artifact://soup@1", str(tmp_path))
    assert code == 2
    assert "exists and is not empty" in error_line(err)
    assert service.requests == []
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"]


@pytest.mark.parametrize("command", ["pull", "push"])
def test_a_malformed_artifact_reference_exits_2_for_pull_and_push_alike(
    run: Any, tmp_path: Path, command: str
) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"{}")
    service = Service({})
    folder = str(tmp_path / "new") if command == "pull" else str(tmp_path)
    argv = [command, "artifact://Not A Name", folder]
    if command == "push":
        argv = [command, folder, "artifact://Not A Name"]
    code, _, err = run(service, *argv)
    assert code == 2
    assert "Invalid artifact reference" in error_line(err)
    assert service.requests == []


def test_pull_of_an_unknown_artifact_exits_2_and_a_server_error_exits_1(
    run: Any, tmp_path: Path
) -> None:
    unknown = Service({})
    code, _, err = run(unknown, "pull", "artifact://nothing@1", str(tmp_path / "a"))
    assert code == 2 and "404" in error_line(err)
    broken = Service(
        {("GET", "/v1/artifacts/soup/versions/1"): problem(500, "Internal error", "boom")}
    )
    code, _, err = run(broken, "pull", "artifact://soup@1", str(tmp_path / "b"))
    assert code == 1 and "500" in error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_key_exits_1_with_a_hint_and_an_invalid_request_exits_2(
    run: Any, tmp_path: Path
) -> None:
    refused = Service({("GET", "/v1/jobs"): problem(401, "Unauthorized", "unknown key")})
    code, _, err = run(refused, "jobs")
    assert code == 1 and "WEIGHTSMITH_TOKEN" in error_line(err)

    recipe = tmp_path / "soup.yaml"
    recipe.write_text("merge_method: linear\nmodels: []\n")
    invalid = Service(
        {
            ("POST", "/v1/jobs"): problem(
                422,
                "Invalid request",
                "1 problem",
                errors=[{"detail": "at least one model", "pointer": "/recipe/models"}],
            )
        }
    )
    code, _, err = run(invalid, "submit", str(recipe))
    assert code == 2 and "/recipe/models" in error_line(err)


def test_a_service_that_keeps_answering_503_exits_1(run: Any) -> None:
    busy = Service({("GET", "/v1/artifacts"): problem(503, "Unavailable", "try later")})
    code, _, err = run(busy, "artifacts")
    assert code == 1 and "503" in error_line(err)
    assert len(busy.requests) == 4  # the first try and three retries


# -- the operator's commands, on a SQLite database ---------------------------------------------


@pytest.fixture
def operator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """``operator(*argv)`` runs an operator command on a fresh embedded-default database."""
    from infra.settings import get_settings

    for name in [k for k in os.environ if k.startswith("WEIGHTSMITH_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("WEIGHTSMITH_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()

    def invoke(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    yield invoke
    get_settings.cache_clear()


def test_tenants_list_and_show_json_name_the_grants_and_never_a_secret(
    operator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert operator("keys", "create", "--tenant", "acme")[0] == 0
    monkeypatch.setenv("WEIGHTSMITH_GRANT_SECRET_ACCESS_KEY", "grant-secret-value")
    granted = operator(
        "tenants",
        "grant-s3",
        "--tenant",
        "acme",
        "s3://datasets/acme/",
        "--access-key-id",
        "AKIDEXAMPLE",
        "--endpoint",
        "http://127.0.0.1:9",
    )
    assert granted[0] == 0, granted
    assert operator("tenants", "grant-hub-push", "--tenant", "acme", "acme-org")[0] == 0

    code, out, _ = operator("tenants", "list", "--json")
    assert code == 0
    (listed,) = json.loads(out)
    assert (listed["name"], listed["state"], listed["hub_token"]) == ("acme", "active", None)
    assert listed["created_at"].startswith("20")  # ISO 8601

    code, out, _ = operator("tenants", "show", "acme", "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["hub_push_namespaces"] == ["acme-org"]
    assert shown["s3_grants"] == [
        {"location": "s3://datasets/acme/", "endpoint": "http://127.0.0.1:9", "credentials": "keys"}
    ]
    assert "grant-secret-value" not in out

    code, _, err = operator("tenants", "show", "nobody", "--json")
    assert code == 2 and "no tenant named 'nobody'" in error_line(err)
