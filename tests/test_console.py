"""The web console's server side: /ui is served without a key, with a strict
Content-Security-Policy and no inline code; the lineage read endpoint it draws from walks
the tenant's own manifests only. (The console in a real browser: tests/test_console_browser.py.)
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from infra.artifacts import MANIFEST, publish_artifact
from testbed.api import ApiHarness

HUB_SHA = "c" * 40


def publish(api: ApiHarness, tenant: str, name: str, parents: list[dict[str, str]], **extra: Any):
    """Publish a one-file version of ``name`` whose manifest names ``parents`` (as a job's
    would, with the roles and pinned references given)."""
    folder = api.tmp / f"out-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    data = name.encode()
    (folder / "model.safetensors").write_bytes(data)
    manifest = {
        "format": "weightsmith.manifest/1",
        "kind": extra.pop("kind", "merge"),
        "parents": [
            {"role": p["role"], "reference": p["pinned"], "pinned": p["pinned"]} for p in parents
        ],
        "files": [
            {
                "path": "model.safetensors",
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        ],
        **extra,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return publish_artifact(api.service.store, tenant, name, folder, job_id=str(uuid.uuid4()))


def lineage(api: ApiHarness, name: str, version: str, headers: dict[str, str] | None = None):
    return api.client.get(
        f"/v1/artifacts/{name}/versions/{version}/lineage", headers=headers or api.headers
    )


# ---- /ui -----------------------------------------------------------------------------------


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline_text: list[str] = []
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._open = tag

    def handle_data(self, data: str) -> None:
        if self._open in ("script", "style") and data.strip():
            self.inline_text.append(data)

    def handle_endtag(self, tag: str) -> None:
        self._open = None


def test_the_console_page_is_served_without_a_key_with_a_strict_csp(api: ApiHarness) -> None:
    page = api.client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    directives = page.headers["content-security-policy"].split("; ")
    csp = {d.partition(" ")[0]: d.partition(" ")[2] for d in directives}
    assert csp["default-src"] == "'self'"
    assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
    assert csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    assert csp["object-src"] == "'none'" and csp["base-uri"] == "'none'"
    assert "unsafe" not in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["x-content-type-options"] == "nosniff"
    redirect = api.client.get("/ui", follow_redirects=False)
    assert redirect.status_code == 308 and redirect.headers["location"] == "/ui/"


def test_the_console_has_no_inline_script_style_or_event_handler(api: ApiHarness) -> None:
    parser = _Tags()
    parser.feed(api.client.get("/ui/").text)
    assert parser.inline_text == []
    scripts = [a for t, a in parser.tags if t == "script"]
    assert scripts and all(a.get("src", "").startswith("/ui/static/") for a in scripts)
    for tag, attrs in parser.tags:
        assert "style" not in attrs, tag
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
    static = Path(__file__).resolve().parent.parent / "app" / "ui" / "static"
    for js in static.glob("*.js"):
        text = js.read_text()
        # nothing parsed as HTML: data reaches the page through textContent only
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text, js.name
        assert "eval(" not in text and "new Function" not in text, js.name
        assert not re.search(r"setAttribute\(\s*[\"']style", text), js.name
        served = api.client.get(f"/ui/static/{js.name}")
        assert served.status_code == 200 and "javascript" in served.headers["content-type"]
        assert "content-security-policy" in served.headers


def test_the_api_answers_keep_their_own_headers(api: ApiHarness) -> None:
    answer = api.client.get("/v1/artifacts", headers=api.headers)
    assert answer.status_code == 200
    assert "content-security-policy" not in answer.headers


def test_a_missing_console_file_is_404(api: ApiHarness) -> None:
    assert api.client.get("/ui/static/nope.js").status_code == 404


# ---- lineage -------------------------------------------------------------------------------


def test_lineage_walks_artifact_parents_back_to_hub_commits_and_paths(api: ApiHarness) -> None:
    t = api.tenant
    publish(
        api,
        t,
        "base-edit",
        [{"role": "base", "pinned": f"org/base@{HUB_SHA}"}],
        kind="edit",
        recipe={"edit_method": "rome"},
        metrics={"gate": {"passed": True}},
    )
    publish(api, t, "other", [{"role": "base", "pinned": "s3://models/other"}])
    publish(
        api,
        t,
        "soup",
        [
            {"role": "base", "pinned": "artifact://base-edit@1"},
            {"role": "model", "pinned": "artifact://other@1"},
            {"role": "model", "pinned": f"org/base@{HUB_SHA}"},
        ],
        method="ties",
    )
    answer = lineage(api, "soup", "latest")
    assert answer.status_code == 200, answer.text
    graph = answer.json()
    assert graph["root"] == "artifact://soup@1" and graph["truncated"] is False
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert set(nodes) == {
        "artifact://soup@1",
        "artifact://base-edit@1",
        "artifact://other@1",
        f"org/base@{HUB_SHA}",
        "s3://models/other",
    }
    assert graph["nodes"][0]["id"] == "artifact://soup@1"
    assert nodes["artifact://soup@1"]["method"] == "ties"
    edit = nodes["artifact://base-edit@1"]
    assert (edit["made_by"], edit["method"], edit["version"]) == ("edit", "rome", 1)
    hub = nodes[f"org/base@{HUB_SHA}"]
    assert (hub["kind"], hub["name"], hub["revision"]) == ("hub", "org/base", HUB_SHA)
    assert nodes["s3://models/other"]["kind"] == "s3"
    edges = {(e["child"], e["parent"], e["role"]) for e in graph["edges"]}
    assert edges == {
        ("artifact://soup@1", "artifact://base-edit@1", "base"),
        ("artifact://soup@1", "artifact://other@1", "model"),
        ("artifact://soup@1", f"org/base@{HUB_SHA}", "model"),
        ("artifact://base-edit@1", f"org/base@{HUB_SHA}", "base"),
        ("artifact://other@1", "s3://models/other", "base"),
    }
    assert len(graph["edges"]) == 5  # the hub commit named twice is one node, two edges


def test_lineage_never_reads_another_tenants_artifacts(api: ApiHarness) -> None:
    other, other_headers = api.new_tenant()
    publish(api, other, "secret", [{"role": "base", "pinned": f"secret/model@{HUB_SHA}"}])
    # this tenant's manifest names an artifact it does not own: the walk stops there
    publish(api, api.tenant, "mine", [{"role": "base", "pinned": "artifact://secret@1"}])
    graph = lineage(api, "mine", "1").json()
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert set(nodes) == {"artifact://mine@1", "artifact://secret@1"}
    assert nodes["artifact://secret@1"]["missing"] is True
    assert "secret/model" not in json.dumps(graph)
    # and the other tenant's own version is not found by this key (same 404 as missing)
    refused = lineage(api, "secret", "1")
    assert refused.status_code == 404
    assert lineage(api, "secret", "1", other_headers).status_code == 200


def test_lineage_needs_an_api_key(api: ApiHarness) -> None:
    publish(api, api.tenant, "keyed", [])
    answer = api.client.get("/v1/artifacts/keyed/versions/1/lineage")
    assert answer.status_code == 401
    assert "Authorization: Bearer" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("name", "version", "says"),
    [
        ("absent", "1", "artifact 'absent' has no version 1 (none published)"),
        ("present", "7", "artifact 'present' has no version 7 (published versions: 1)"),
        ("present", "x1", "version 'x1' of artifact 'present'"),
        ("Bad Name", "1", "artifact 'Bad Name'"),
    ],
)
def test_lineage_of_an_unknown_version_is_404_naming_it(
    api: ApiHarness, name: str, version: str, says: str
) -> None:
    publish(api, api.tenant, "present", [])
    answer = lineage(api, name, version)
    assert answer.status_code == 404, answer.text
    assert says in answer.json()["detail"]


def test_lineage_stops_at_the_node_limit_and_says_so(
    api: ApiHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    import infra.lineage

    monkeypatch.setattr(infra.lineage, "MAX_LINEAGE_NODES", 3)
    parents = [{"role": "model", "pinned": f"org/m{i}@{HUB_SHA}"} for i in range(5)]
    publish(api, api.tenant, "wide", parents)
    graph = lineage(api, "wide", "1").json()
    assert graph["truncated"] is True
    assert [n["id"] for n in graph["nodes"]] == [
        "artifact://wide@1",
        f"org/m0@{HUB_SHA}",
        f"org/m1@{HUB_SHA}",
    ]
    assert len(graph["edges"]) == 2
