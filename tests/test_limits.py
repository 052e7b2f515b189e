"""Hostile input meets its limits before any work: body size and authentication before the
body is read, parsing caps (nesting, YAML anchors, string and list sizes, finite numbers),
malformed path segments and query parameters, and the attacks of issue #14 replayed.

API tests run the real app on SQLite and PostgreSQL (fixtures of tests/conftest.py). Bodies
are streamed to the app at the ASGI level where it matters how much of them was read.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
import uvicorn
import yaml

from app import limits
from infra.db.jobstore import encode_cursor
from infra.settings import Settings
from schemas.limits import (
    FLOAT32_MAX,
    MAX_MODELS_PER_RECIPE,
    MAX_NESTING_DEPTH,
    MAX_RECIPE_BYTES,
    DocumentRefused,
    json_nesting,
    load_json_document,
    load_yaml_document,
)
from testbed.api import MERGE_RECIPE, ApiHarness, merge_job
from tests.support.api import MakeApi, assert_problem

MiB = 1 << 20

# ---- helpers -------------------------------------------------------------------------------


def stream(
    api: ApiHarness,
    method: str,
    path: str,
    headers: dict[str, str],
    chunks: Iterator[bytes],
) -> tuple[int, dict[str, Any], int]:
    """Call the app at the ASGI level with a body streamed from ``chunks`` (as a server does
    with a chunked upload); returns the status, the JSON answer and how many chunks the app
    asked for."""
    pulled = 0
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }

    async def run() -> None:
        await api.client.app(scope, receive, send)

    api.client.portal.call(run)  # type: ignore[attr-defined]
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], json.loads(body), pulled


def endless(chunk_size: int = 64 * 1024, total: int = 400 * MiB) -> Iterator[bytes]:
    """400 MB of body, made only as it is asked for."""
    for _ in range(total // chunk_size):
        yield b"x" * chunk_size


def post_json(api: ApiHarness, path: str, body: Any, **headers: str) -> Any:
    return api.client.post(
        path,
        content=json.dumps(body),
        headers={**api.headers, "Content-Type": "application/json", **headers},
    )


def post_text(api: ApiHarness, text: str | bytes, content_type: str) -> Any:
    return api.client.post(
        "/v1/jobs", content=text, headers={**api.headers, "Content-Type": content_type}
    )


def pointers(body: dict[str, Any]) -> list[str]:
    return [e.get("pointer") for e in body.get("errors", [])]


def jobs_of(api: ApiHarness) -> list[dict[str, Any]]:
    r = api.client.get("/v1/jobs", headers=api.headers)
    assert r.status_code == 200
    items: list[dict[str, Any]] = r.json()["items"]
    return items


# ---- body size and authentication, before the body is read ---------------------------------


def test_an_unauthenticated_streamed_body_is_answered_401_without_being_read(api: ApiHarness):
    tracemalloc.start()
    try:
        status, body, pulled = stream(
            api, "POST", "/v1/webhooks", {"Content-Type": "application/json"}, endless()
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 401
    assert body["title"] == "Unauthorized" and "API key" in body["detail"]
    assert pulled == 0  # not one chunk of the 400 MB was asked for
    assert peak < 8 * MiB


def test_a_bad_key_is_refused_before_the_body_is_read(api: ApiHarness):
    bad = {"Authorization": "Bearer wsk_0123456789_" + "0" * 64}
    status, body, pulled = stream(api, "POST", "/v1/jobs", bad, endless())
    assert (status, pulled) == (401, 0)
    assert "malformed, unknown or revoked" in body["detail"]


def test_a_content_length_over_the_limit_is_answered_413_at_once(api: ApiHarness):
    for headers in ({}, api.headers):  # before authentication: nothing is looked up
        status, body, pulled = stream(
            api, "POST", "/v1/webhooks", {**headers, "Content-Length": str(400 * MiB)}, endless()
        )
        assert (status, pulled) == (413, 0)
        assert "WEIGHTSMITH_MAX_BODY_BYTES" in body["detail"] and str(MiB) in body["detail"]


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/webhooks", "/v1/schedules"])
def test_an_authenticated_streamed_body_is_cut_off_with_413_once_past_the_limit(
    api: ApiHarness, path: str
):
    chunk = 64 * 1024
    tracemalloc.start()
    try:
        status, body, pulled = stream(
            api, "POST", path, {**api.headers, "Content-Type": "application/json"}, endless(chunk)
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 413, body
    assert body["status"] == 413 and "WEIGHTSMITH_MAX_BODY_BYTES" in body["detail"]
    assert pulled == MiB // chunk + 1  # the chunk that passed the limit, and not one more
    assert peak < 8 * MiB  # a few copies of 1 MiB at most, not 400 MB
    assert jobs_of(api) == []


def test_the_body_limit_is_the_max_body_bytes_setting(make_api: MakeApi):
    api = make_api(max_body_bytes=4096)
    small = merge_job()
    assert len(json.dumps(small)) < 4096
    assert post_json(api, "/v1/jobs", small).status_code == 202
    big = merge_job({**MERGE_RECIPE, "output": {"name": "n" * 150}})
    big["recipe"]["models"] = big["recipe"]["models"] * 30
    assert len(json.dumps(big)) > 4096
    refused = assert_problem(post_json(api, "/v1/jobs", big), 413)
    assert "4096 bytes" in refused["detail"]


def test_a_route_in_body_limits_takes_the_larger_limit_its_setting_names(
    make_api: MakeApi, monkeypatch: pytest.MonkeyPatch
):
    class WithBigBodies(Settings):
        big_body_bytes: int = 3 * MiB

    rule = limits.BodyLimit("POST", re.compile(r"^/v1/jobs$"), "big_body_bytes")
    monkeypatch.setattr(limits, "BODY_LIMITS", [rule])
    api = make_api(settings_class=WithBigBodies)
    body = json.dumps({**merge_job(), "padding": " " * (2 * MiB)})
    # 2 MiB passes this route's limit (the body is then refused for its unknown field) …
    r = post_text(api, body, "application/json")
    assert r.status_code == 422 and pointers(r.json()) == ["/padding"]
    # … but not another route's, nor 4 MiB here
    webhook = api.client.post(
        "/v1/webhooks", content=body, headers={**api.headers, "Content-Type": "application/json"}
    )
    assert "WEIGHTSMITH_MAX_BODY_BYTES" in assert_problem(webhook, 413)["detail"]
    bigger = post_text(api, body + " " * (2 * MiB), "application/json")
    assert "WEIGHTSMITH_BIG_BODY_BYTES" in assert_problem(bigger, 413)["detail"]


@contextmanager
def served(app: Any) -> Iterator[int]:
    """``app`` (already started by the test client) behind a real uvicorn on loopback."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.01)
            assert thread.is_alive(), "uvicorn did not start"
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join()


def answer_to(port: int, head: bytes, first_chunk: bytes = b"") -> bytes:
    """Send a request head (and maybe one chunk of its body), then read the answer: it comes
    though the rest of the announced body is never sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + first_chunk)
        return s.recv(65536)


def test_a_real_server_answers_401_and_413_without_waiting_for_the_body(api: ApiHarness):
    with served(api.client.app) as port:
        chunked = answer_to(
            port,
            b"POST /v1/webhooks HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            b"10000\r\n" + b"x" * 0x10000 + b"\r\n",  # 64 KiB of a body that never ends
        )
        assert chunked.startswith(b"HTTP/1.1 401"), chunked[:200]
        assert b"application/problem+json" in chunked
        key = api.headers["Authorization"].encode()
        announced = answer_to(
            port,
            b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nAuthorization: " + key + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 400000000\r\n\r\n",
        )
        assert announced.startswith(b"HTTP/1.1 413"), announced[:200]
    assert jobs_of(api) == []


def test_a_malformed_content_length_is_a_400(api: ApiHarness):
    status, body, pulled = stream(
        api, "POST", "/v1/jobs", {**api.headers, "Content-Length": "12x"}, iter([b"{}"])
    )
    assert (status, pulled) == (400, 0)
    assert "Content-Length" in body["detail"]


def test_every_v1_path_needs_a_key_even_unknown_ones_and_before_body_validation(
    api: ApiHarness,
):
    assert_problem(api.client.get("/v1/nothing-here"), 401)
    bad_json = api.client.post(
        "/v1/webhooks", content="{", headers={"Content-Type": "application/json"}
    )
    assert_problem(bad_json, 401)
    # with a key, the same body is judged
    assert_problem(post_text(api, "{", "application/json"), 422)
    for open_path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        assert api.client.get(open_path).status_code == 200, open_path


# ---- parsing: YAML anchors, nesting, numbers, characters -------------------------------------


def billion_laughs() -> str:
    """The attack's body: nine levels of anchors, each aliasing the previous one nine times
    (9⁹ ≈ 387 M strings once expanded), inside a job body."""
    lines = ['kind: merge', 'artifact_name: laughs', 'recipe:', '  merge_method: linear',
             '  l0: &l0 "lol"']  # fmt: skip
    for level in range(1, 10):
        refs = ", ".join([f"*l{level - 1}"] * 9)
        lines.append(f"  l{level}: &l{level} [{refs}]")
    lines += ["  models:", "    - model: s3://models/a", "      parameters: {weight: *l9}"]
    return "\n".join(lines) + "\n"


def test_a_yaml_billion_laughs_is_refused_naming_anchors_and_stores_nothing(api: ApiHarness):
    text = billion_laughs()
    body = assert_problem(post_text(api, text, "application/yaml"), 422)
    assert "YAML anchors are not accepted" in body["detail"]
    assert "line 5" in body["detail"]  # the first anchor
    assert jobs_of(api) == []
    assert len(api.client.get("/v1/jobs", headers=api.headers).content) < 100


def test_yaml_aliases_and_tags_are_refused(api: ApiHarness):
    job = yaml.safe_dump(merge_job())
    tagged = job.replace("artifact_name: soup", "artifact_name: !!str soup")
    assert "YAML tags" in assert_problem(post_text(api, tagged, "text/yaml"), 422)["detail"]
    python = job.replace("artifact_name: soup", "artifact_name: !!python/name:os.system ''")
    assert "YAML tags" in assert_problem(post_text(api, python, "text/yaml"), 422)["detail"]
    # an alias to an anchor defined elsewhere in the stream is refused at the alias
    assert "aliases" in str(_refusal(load_yaml_document, b"- *x\n"))


def _refusal(load: Any, body: bytes) -> DocumentRefused:
    with pytest.raises(DocumentRefused) as e:
        load(body)
    return e.value


@pytest.mark.parametrize("content_type", ["application/json", "application/yaml"])
def test_bodies_nested_100k_deep_are_a_422_without_recursion_or_error_logs(
    api: ApiHarness, content_type: str, caplog: pytest.LogCaptureFixture
):
    deep = "[" * 100_000 + "]" * 100_000
    text = f'{{"kind": "merge", "artifact_name": "deep", "recipe": {{"x": {deep}}}}}'
    with caplog.at_level(logging.WARNING):
        body = assert_problem(post_text(api, text, content_type), 422)
    assert "nested deeper than 32 levels" in body["detail"]
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    # the same through a pydantic body parameter
    webhook = api.client.post(
        "/v1/webhooks",
        content=text,
        headers={**api.headers, "Content-Type": "application/json"},
    )
    assert "nested deeper" in assert_problem(webhook, 422)["detail"]


def test_nesting_is_accepted_up_to_the_cap_and_refused_one_level_past_it():
    def nested(levels: int) -> bytes:
        return ("[" * levels + "]" * levels).encode()

    assert load_json_document(nested(MAX_NESTING_DEPTH)) is not None
    assert "deeper than 32" in str(_refusal(load_json_document, nested(MAX_NESTING_DEPTH + 1)))
    assert load_yaml_document(nested(MAX_NESTING_DEPTH)) is not None
    assert "deeper than 32" in str(_refusal(load_yaml_document, nested(MAX_NESTING_DEPTH + 1)))
    block = "".join("  " * i + "k:\n" for i in range(MAX_NESTING_DEPTH + 1)) + "  v"
    assert "deeper than 32" in str(_refusal(load_yaml_document, block.encode()))


def test_json_nesting_is_counted_outside_strings_only():
    assert json_nesting(b'{"a": "[[[[{{{{", "b": [[1]]}') == 3
    assert json_nesting(b'["\\"[[[", ["\\\\"], "]]]"]') == 2
    assert json_nesting(b"") == 0
    # an unterminated string hides the rest; the parser refuses the body afterwards
    assert json_nesting(b'[["abc [[[[') == 2
    # quotes and backslashes in any arrangement are one linear scan (this would take hours
    # if a failed string match rescanned the rest of the body from every later quote)
    assert json_nesting(b'"' + b'\\"' * 400_000) == 0
    assert json_nesting(b'"\\' * 300_000 + b"\\") == 0


@pytest.mark.parametrize(
    ("text", "content_type", "pointer"),
    [
        ('{"kind": "merge", "artifact_name": "x", "recipe": NaN}', "application/json", ""),
        ('{"kind": "merge", "artifact_name": "x", "recipe": {"seed": 1e400}}', "application/json",
         "/recipe/seed"),
        ("kind: merge\nartifact_name: x\nrecipe: {seed: .inf}\n", "application/yaml",
         "/recipe/seed"),
        ('{"kind": "merge", "artifact_name": "x", "recipe": {"seed": 123456789012345678901234}}',
         "application/json", "/recipe/seed"),
    ],
)  # fmt: skip
def test_non_finite_numbers_and_integers_past_64_bits_are_refused_where_they_are(
    api: ApiHarness, text: str, content_type: str, pointer: str
):
    body = assert_problem(post_text(api, text, content_type), 422)
    if pointer:
        assert pointers(body) == [pointer]
    assert re.search(r"finite|64 bits", body["detail"])


@pytest.mark.parametrize("bad", ["a\x00b", "a\ud800b"])
def test_nul_characters_and_lone_surrogates_are_refused_before_anything_is_stored(
    api: ApiHarness, bad: str
):
    # json.dumps escapes both (\u0000, \ud800): the JSON text itself is valid
    recipe = {**MERGE_RECIPE, "output": {"name": bad}}
    body = assert_problem(post_json(api, "/v1/jobs", merge_job(recipe)), 422)
    assert pointers(body) == ["/recipe/output/name"]
    hook = post_json(api, "/v1/webhooks", {"url": "https://example.com/h", "events":
                     ["job.failed"], "description": bad})  # fmt: skip
    assert pointers(assert_problem(hook, 422)) == ["/description"]
    schedule = post_json(api, "/v1/schedules", {**merge_job(recipe), "cron": "0 3 * * *"})
    assert pointers(assert_problem(schedule, 422)) == ["/recipe/output/name"]
    assert jobs_of(api) == []


def test_yaml_dates_stay_strings_as_in_json():
    assert load_yaml_document(b"name: 2024-01-01\n") == {"name": "2024-01-01"}
    assert "not a string" in str(_refusal(load_yaml_document, b"{1: a}\n"))


# ---- recipe caps --------------------------------------------------------------------------


def test_a_recipe_of_16k_models_is_refused_naming_models(api: ApiHarness):
    models = [{"model": f"s3://models/m{i}"} for i in range(16_000)]
    body = assert_problem(post_json(api, "/v1/jobs", merge_job({**MERGE_RECIPE, "models":
                          models})), 422)  # fmt: skip
    assert pointers(body) == ["/recipe/models"]
    assert "16000 entries" in body["detail"]


def test_models_per_recipe_are_capped_at_64(api: ApiHarness):
    def with_models(n: int) -> dict[str, Any]:
        models = [{"model": f"s3://models/m{i}", "parameters": {"weight": 1.0}} for i in range(n)]
        return merge_job({"merge_method": "linear", "models": models}, name="many")

    assert post_json(api, "/v1/jobs", with_models(MAX_MODELS_PER_RECIPE)).status_code == 202
    body = assert_problem(post_json(api, "/v1/jobs", with_models(MAX_MODELS_PER_RECIPE + 1)), 422)
    assert pointers(body) == ["/recipe/models"] and "at most 64" in body["detail"]


def test_the_recipe_as_stored_is_capped_and_listing_jobs_stays_small(api: ApiHarness):
    filters = [{"filter": f"layers.{i}." + "m" * 240, "value": 0.5} for i in range(256)]
    models = [{"model": f"s3://models/m{i}", "parameters": {"weight": filters}} for i in range(8)]
    recipe = {"merge_method": "linear", "models": models}
    size = len(json.dumps(recipe, sort_keys=True, separators=(",", ":")))
    assert MAX_RECIPE_BYTES < size < MiB
    body = assert_problem(post_json(api, "/v1/jobs", merge_job(recipe)), 422)
    assert pointers(body) == ["/recipe"] and f"{size} bytes" in body["detail"]
    assert jobs_of(api) == []


@pytest.mark.parametrize(
    ("recipe_change", "pointer"),
    [
        ({"models": [{"model": "s3://models/" + "p" * 1100}]}, "/recipe/models/0/model"),
        ({"parameters": {"weight": [1.0] * 257}}, "/recipe/parameters/weight"),
        ({"parameters": {"weight": [{"filter": "f" * 257, "value": 1}]}},
         "/recipe/parameters/weight/0/filter"),
        ({"output": {"name": "n" * 201}}, "/recipe/output/name"),
        ({"output": {"shard_size": "9" * 400 + "GB"}}, "/recipe/output/shard_size"),
    ],
)  # fmt: skip
def test_merge_recipe_string_and_list_caps_point_at_the_field(
    api: ApiHarness, recipe_change: dict[str, Any], pointer: str
):
    recipe = {"merge_method": "linear", "models": [{"model": "s3://models/a"}], **recipe_change}
    assert pointers(assert_problem(post_json(api, "/v1/jobs", merge_job(recipe)), 422)) == [pointer]


def _merge(method: str, *models: dict[str, Any], **top: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "merge_method": method,
        "base_model": "s3://models/base",
        "models": [{"model": f"s3://models/m{i}", **m} for i, m in enumerate(models)],
    }
    return {**recipe, "parameters": top} if top else recipe


@pytest.mark.parametrize(
    ("recipe", "pointer", "words"),
    [
        (_merge("average", {}), "/recipe/merge_method", "unknown method 'average'; valid:"),
        ({**_merge("linear", {}), "slices": []}, "/recipe/slices", "not both"),
        ({"merge_method": "slerp", "base_model": "s3://models/base", "parameters": {"t": 0.5},
          "slices": [{"sources": [{"model": "s3://models/base", "layer_range": [0, 4]},
                                  {"model": "s3://models/m1", "layer_range": [2, 4]}]}]},
         "/recipe/slices/0/sources/1/layer_range", "spans 2 layers"),
        ({"merge_method": "ties", "base_model": "s3://models/base",
          "slices": [{"sources": [{"model": "s3://models/m1", "layer_range": [0, 4]}]}]},
         "/recipe/slices/0/sources", "must be one of the slice's sources"),
        ({"merge_method": "ties", "models": [{"model": "s3://models/a"}]}, "/recipe/base_model",
         "needs a base model"),
        (_merge("model_stock", {}), "/recipe/models", "at least 2 model(s)"),
        (_merge("slerp", {}), "/recipe/parameters/t", "slerp needs the interpolation factor"),
        # DELLA's density ± epsilon: the model's own setting, else the top level's
        (_merge("della", {}, {"parameters": {"density": 0.9, "epsilon": 0.2}}),
         "/recipe/models/1/parameters/density", "got density 0.9, epsilon 0.2"),
        (_merge("della", {}, {"parameters": {"epsilon": 0.3}}, density=0.8),
         "/recipe/models/1/parameters/epsilon", "got density 0.8, epsilon 0.3"),
        (_merge("della", {}, density=0.1), "/recipe/parameters/density",
         "got density 0.1, epsilon 0.15 for models[0]"),
        # a whole-model threshold takes one density per model
        (_merge("ties", {"parameters": {"density": [0.2, 0.4]}}, scope="global"),
         "/recipe/models/0/parameters/density", "one value per model"),
        (_merge("ties", {}, scope="global", density=[{"filter": "mlp", "value": 0.2}]),
         "/recipe/parameters/density", "one value per model"),
    ],
)  # fmt: skip
def test_recipe_rules_of_a_method_point_at_the_field(
    api: ApiHarness, recipe: dict[str, Any], pointer: str, words: str
):
    body = assert_problem(post_json(api, "/v1/jobs", merge_job(recipe)), 422)
    assert pointers(body) == [pointer]
    assert words in body["errors"][0]["detail"]
    assert jobs_of(api) == []


def edit_job(**changes: Any) -> dict[str, Any]:
    request = {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome"}
    recipe = {"edit_method": "memit", "model": "s3://models/base", "requests": [request]}
    for key, value in changes.items():
        if key == "request":
            request.update(value)
        else:
            recipe[key] = value
    return {"kind": "edit", "recipe": recipe, "artifact_name": "edited"}


@pytest.mark.parametrize(
    ("job", "pointer"),
    [
        (edit_job(request={"prompt": "France " + "x" * 2000}), "/recipe/requests/0/prompt"),
        (edit_job(request={"neighborhood_prompts": ["a"] * 65}),
         "/recipe/requests/0/neighborhood_prompts"),
        (edit_job(hyperparameters={"layers": list(range(257))}), "/recipe/hyperparameters/layers"),
        (edit_job(hyperparameters={"v_lr": 1e39}), "/recipe/hyperparameters/v_lr"),
        (edit_job(hyperparameters={"context_template_counts": [[10**6, 5]]}),
         "/recipe/hyperparameters/context_template_counts"),
        (edit_job(covariance={"source": "model_samples", "tokens": 10**12}),
         "/recipe/covariance/tokens"),
    ],
)  # fmt: skip
def test_edit_recipe_caps_point_at_the_field(api: ApiHarness, job: dict[str, Any], pointer: str):
    assert pointer in pointers(assert_problem(post_json(api, "/v1/jobs", job), 422))


def test_an_ordinary_edit_job_is_accepted(api: ApiHarness):
    assert post_json(api, "/v1/jobs", edit_job()).status_code == 202


def test_webhook_and_callback_urls_are_capped(api: ApiHarness):
    long_url = "https://example.com/" + "a" * 2100
    hook = post_json(api, "/v1/webhooks", {"url": long_url, "events": ["job.failed"]})
    assert pointers(assert_problem(hook, 422)) == ["/url"]
    events = post_json(api, "/v1/webhooks", {"url": "https://example.com/h",
                       "events": ["job.failed"] * 17})  # fmt: skip
    assert pointers(assert_problem(events, 422)) == ["/events"]
    job = post_json(api, "/v1/jobs", {**merge_job(), "callback_url": long_url})
    assert pointers(assert_problem(job, 422)) == ["/callback_url"]


# ---- finite numbers within float32 ---------------------------------------------------------


def linear(*weights: float, **top: Any) -> dict[str, Any]:
    models = [{"model": f"s3://models/m{i}", "parameters": {"weight": w}} for i, w in
              enumerate(weights)]  # fmt: skip
    return {"merge_method": "linear", "models": models, **({"parameters": top} if top else {})}


def with_base(method: str, *weights: float, **top: Any) -> dict[str, Any]:
    return {**linear(*weights, **top), "merge_method": method, "base_model": "s3://models/base"}


@pytest.mark.parametrize(
    ("recipe", "pointer", "words"),
    [
        # the attack: one weight no float32 can hold
        (linear(1e300, 1.0), "/recipe/models/0/parameters/weight", "3.403e+38"),
        (linear(1.0, -1e39), "/recipe/models/1/parameters/weight", "3.403e+38"),
        # each representable, their sum not: the float32 sum of the weighted models overflows
        (linear(3e38, 3e38), "/recipe/models/1/parameters/weight", "6e+38"),
        # task arithmetic scales each weight by lambda
        (with_base("task_arithmetic", 1.0, 0.5, **{"lambda": 3e38}), "/recipe/parameters/lambda",
         "4.5e+38"),
        # DARE with inverse_p divides the kept entries by the density
        (with_base("dare_linear", 1.0, 1.0, rescale_mode="inverse_p", density=1e-39),
         "/recipe/parameters/density", "/density"),
        # a model's own density is the one that applies to it
        ({**with_base("dare_linear", 1.0, rescale_mode="inverse_p", density=0.5),
          "models": [{"model": "s3://models/a", "parameters": {"density": 1e-39}}]},
         "/recipe/models/0/parameters/density", "/density"),
        # a gradient counts at its largest value
        (linear(1.0, weight=[0.5, 3.5e38]), "/recipe/parameters/weight", "3.403e+38"),
    ],
)  # fmt: skip
def test_merges_whose_float32_arithmetic_would_overflow_are_refused_naming_the_field(
    api: ApiHarness, recipe: dict[str, Any], pointer: str, words: str
):
    body = assert_problem(post_json(api, "/v1/jobs", merge_job(recipe)), 422)
    assert pointers(body) == [pointer]
    assert words in body["detail"]
    assert jobs_of(api) == []


def test_large_but_representable_merges_are_accepted(api: ApiHarness):
    # the float32 bound is far from any ordinary recipe: these still pass
    for recipe in (
        linear(1e30, -1e30, 2.0),
        linear(FLOAT32_MAX / 2, FLOAT32_MAX / 4),
        with_base("task_arithmetic", 1.0, 0.5, **{"lambda": 1e6}),
        with_base("dare_linear", 1.0, 1.0, rescale_mode="inverse_p", density=1e-6),
        # a tiny top-level density no model uses: each sets its own
        {**with_base("dare_linear", rescale_mode="inverse_p", density=1e-39),
         "models": [{"model": "s3://models/a", "parameters": {"density": 0.5}}]},
    ):  # fmt: skip
        r = post_json(api, "/v1/jobs", merge_job(recipe))
        assert r.status_code == 202, r.text


def test_nan_is_refused_in_a_merge_parameter_whatever_the_format(api: ApiHarness):
    yaml_body = (
        "kind: merge\nartifact_name: nan\nrecipe:\n  merge_method: linear\n  models:\n"
        "    - model: s3://models/a\n      parameters: {weight: .nan}\n"
    )
    body = assert_problem(post_text(api, yaml_body, "application/yaml"), 422)
    assert pointers(body) == ["/recipe/models/0/parameters/weight"]
    json_body = json.dumps(merge_job(linear(1.0))).replace("1.0", "NaN")
    assert "NaN" in assert_problem(post_text(api, json_body, "application/json"), 422)["detail"]


# ---- path segments, query parameters, headers ----------------------------------------------


@pytest.mark.parametrize("version", ["²", "①", "٣", "0", "-1", "1.0", "9" * 30, "latest%00"])
def test_malformed_artifact_versions_are_404_never_500(api: ApiHarness, version: str):
    api.publish("soup", {"config.json": b"{}"})
    for suffix in ("", "/files/config.json"):
        r = api.client.get(f"/v1/artifacts/soup/versions/{version}{suffix}", headers=api.headers)
        assert_problem(r, 404)


@pytest.mark.parametrize("version", ["²", "①", "٣"])
def test_unicode_digits_in_an_artifact_reference_are_refused(api: ApiHarness, version: str):
    recipe = {**MERGE_RECIPE, "base_model": f"artifact://soup@{version}"}
    body = assert_problem(post_json(api, "/v1/jobs", merge_job(recipe)), 422)
    assert pointers(body) == ["/recipe/base_model"]


@pytest.mark.parametrize("segment", ["%00", "a%00b", "%F0%9F%98%80", "x" * 300, "%ED%A0%80"])
def test_malformed_ids_in_paths_are_404_on_every_route(api: ApiHarness, segment: str):
    for method, path in [
        ("GET", "/v1/jobs/{}"),
        ("POST", "/v1/jobs/{}/cancel"),
        ("GET", "/v1/jobs/{}/deliveries"),
        ("GET", "/v1/schedules/{}"),
        ("PATCH", "/v1/schedules/{}"),
        ("DELETE", "/v1/schedules/{}"),
        ("GET", "/v1/schedules/{}/runs"),
        ("GET", "/v1/webhooks/{}"),
        ("DELETE", "/v1/webhooks/{}"),
        ("GET", "/v1/webhooks/{}/deliveries"),
        ("GET", "/v1/artifacts/{}/versions"),
    ]:
        kwargs: dict[str, Any] = {"json": {"enabled": False}} if method == "PATCH" else {}
        r = api.client.request(method, path.format(segment), headers=api.headers, **kwargs)
        assert_problem(r, 404)


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/schedules"])
def test_cursors_that_do_not_name_a_row_are_a_422(api: ApiHarness, path: str):
    now = datetime.now(UTC)
    for cursor in (encode_cursor(now, "a\x00b"), encode_cursor(now, "é"), "x" * 300, "%%%"):
        r = api.client.get(path, params={"cursor": cursor}, headers=api.headers)
        assert_problem(r, 422)


def test_an_idempotency_key_is_printable_ascii_of_at_most_255_characters(api: ApiHarness):
    for key in ("k" * 256, "clé", "tab\there"):
        r = api.submit(headers={"Idempotency-Key": key.encode("latin-1")})
        assert pointers(assert_problem(r, 422)) == ["/header/Idempotency-Key"]
    assert api.submit(headers={"Idempotency-Key": "k" * 255}).status_code == 202
    assert api.enqueued and len(api.enqueued) == 1


def test_unicode_digits_in_a_cron_field_are_a_clear_422(api: ApiHarness):
    r = post_json(api, "/v1/schedules", {**merge_job(), "cron": "² * * * *"})
    body = assert_problem(r, 422)
    assert pointers(body) == ["/cron"] and "is not a number" in body["detail"]


def test_openapi_declares_json_and_yaml_job_bodies_and_every_reference_resolves(
    api: ApiHarness,
):
    spec = api.client.get("/openapi.json").json()
    content = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    for media in ("application/json", "application/yaml", "text/yaml"):
        kinds = {v["properties"]["kind"]["enum"][0] for v in content[media]["schema"]["oneOf"]}
        assert kinds == {"merge", "edit", "extract_lora", "moe"}
    text = json.dumps(spec)
    for ref in set(re.findall(r'"\$ref": "([^"]+)"', text)):
        node: Any = spec
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]  # KeyError: a dangling reference
