"""Versioned artifacts (infra/artifacts.py) on a local directory and on SeaweedFS.

Publishing: every manifest file uploaded with its sha256 checked, the manifest last, a
version visible only once its manifest exists. Version numbers: allocated by conditional
create, never reused after a failed or crashed publish, distinct among concurrent
publishers. Reading: listing, resolving "latest", reading manifests, downloading with every
sha256 checked (a tampered object is named in the error). Re-use: recipe-hash lookup and
idempotent re-publish of the same job.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from infra.artifacts import (
    MANIFEST,
    ArtifactError,
    ArtifactIntegrityError,
    ArtifactNotFound,
    ArtifactVersion,
    ManifestError,
    compute_recipe_hash,
    download_artifact,
    find_by_recipe_hash,
    list_artifacts,
    list_versions,
    manifest_recipe_hash,
    publish_artifact,
    read_manifest,
    resolve_artifact,
    sweep_incomplete,
)
from infra.storage import LocalObjectStore, ObjectStore
from testbed.s3 import S3Server
from tests.support.stores import make_store

MiB = 1 << 20
T = "acme"  # tenant


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    return make_store(request.param, request, tmp_path, part_size=5 * MiB)


def make_output(
    folder: Path, *, seed: int = 1, big: int = 0, files: dict[str, bytes] | None = None
) -> Path:
    """An output directory like the merge engine's: files plus a manifest listing them."""
    folder.mkdir(parents=True)
    content = files or {
        "model-00001-of-00002.safetensors": b"shard one " * 1000,
        "model-00002-of-00002.safetensors": b"shard two " * 700,
        "model.safetensors.index.json": b'{"weight_map": {}}',
        "config.json": b'{"model_type": "llama"}',
        "tokenizer.json": b"{}",
        "README.md": b"# merge\n",
    }
    if big:
        content = {**content, "model-big.safetensors": bytes(range(256)) * (big // 256)}
    for name, data in content.items():
        (folder / name).write_bytes(data)
    manifest = {
        "format": "weightsmith.manifest/1",
        "kind": "merge",
        "seed": seed,
        "recipe": {"merge_method": "ties", "base_model": "org/base@" + "a" * 40},
        "parents": [{"role": "base", "reference": "org/base", "pinned": "org/base@" + "a" * 40}],
        "files": [
            {"path": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
            for n, d in sorted(content.items())
        ],
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


def _numbers(store: ObjectStore, name: str = "llama-ties") -> list[int]:
    return [v.version for v in list_versions(store, T, name)]


def _fail_on_nth_put_file(store: ObjectStore, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the n-th put_file raise, as a worker dying mid-upload would."""
    real: Callable[..., Any] = store.put_file
    calls = {"n": 0}

    def put_file(key: str, path: Path, *, sha256: str | None = None) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            raise ConnectionError("simulated crash in the middle of a publish")
        return real(key, path, sha256=sha256)

    monkeypatch.setattr(store, "put_file", put_file)


# -- publish and read back -----------------------------------------------------------------


def test_publish_list_resolve_read_and_download(store: ObjectStore, tmp_path: Path) -> None:
    out = make_output(tmp_path / "out", big=11 * MiB)  # the big file goes as 3 parts on S3
    v1 = publish_artifact(store, T, "llama-ties", out, job_id="job-1")
    assert (v1.version, v1.reference) == (1, "artifact://llama-ties@1")
    assert v1.prefix == "acme/llama-ties/v1/"
    assert v1.published_at is not None
    manifest = read_manifest(store, T, "llama-ties", 1)
    local = json.loads((out / MANIFEST).read_text())
    assert manifest["files"] == local["files"]
    assert manifest["artifact"] == {
        **manifest["artifact"],
        "tenant": T,
        "name": "llama-ties",
        "version": 1,
        "reference": "artifact://llama-ties@1",
        "job_id": "job-1",
        "recipe_hash": manifest_recipe_hash(local),
    }

    v2 = publish_artifact(store, T, "llama-ties", out, job_id="job-2")
    assert v2.version == 2
    assert _numbers(store) == [1, 2]
    assert resolve_artifact(store, T, "llama-ties", "latest").version == 2
    assert resolve_artifact(store, T, "llama-ties", "1").version == 1
    assert [(a.name, a.version) for a in list_artifacts(store, T)] == [("llama-ties", 2)]
    assert list_artifacts(store, "other-tenant") == []

    dest = download_artifact(store, T, "llama-ties", 1, tmp_path / "dl" / "model")
    for entry in local["files"]:
        assert (dest / entry["path"]).read_bytes() == (out / entry["path"]).read_bytes()
    assert json.loads((dest / MANIFEST).read_text())["artifact"]["version"] == 1
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["model"]


def test_the_manifest_is_uploaded_last(
    store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = make_output(tmp_path / "out")
    order: list[str] = []
    real_file, real_bytes = store.put_file, store.put_bytes

    def put_file(key: str, path: Path, *, sha256: str | None = None) -> Any:
        order.append(key)
        assert store.stat("acme/m/v1/manifest.json") is None
        return real_file(key, path, sha256=sha256)

    def put_bytes(key: str, data: bytes, *, if_absent: bool = False) -> Any:
        order.append(key)
        return real_bytes(key, data, if_absent=if_absent)

    monkeypatch.setattr(store, "put_file", put_file)
    monkeypatch.setattr(store, "put_bytes", put_bytes)
    publish_artifact(store, T, "m", out, job_id="j")
    in_version = [k for k in order if k.startswith("acme/m/v1/")]
    assert in_version[-1] == "acme/m/v1/manifest.json"
    assert len(in_version) == 1 + len(json.loads((out / MANIFEST).read_text())["files"])
    assert order[0] == "acme/m/versions/v1.claim"


# -- visibility and never reusing a number -------------------------------------------------


def test_a_version_without_manifest_is_invisible(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("acme/m/v1/model.safetensors", b"partial")
    store.put_bytes("acme/m/versions/v1.claim", b"{}")
    assert list_versions(store, T, "m") == []
    assert list_artifacts(store, T) == []
    with pytest.raises(ArtifactNotFound, match="no published version"):
        resolve_artifact(store, T, "m", "latest")
    with pytest.raises(ArtifactNotFound, match="no version 1"):
        read_manifest(store, T, "m", 1)
    with pytest.raises(ArtifactNotFound):
        download_artifact(store, T, "m", 1, tmp_path / "dl")
    assert not (tmp_path / "dl").exists()
    # once published, the next number is used and only it is visible
    assert publish_artifact(store, T, "m", make_output(tmp_path / "o"), job_id="j").version == 2
    assert _numbers(store, "m") == [2]


def test_a_failed_publish_leaves_nothing_visible_and_its_number_is_never_reused(
    store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = make_output(tmp_path / "out")
    with monkeypatch.context() as m:
        _fail_on_nth_put_file(store, 3, m)
        with pytest.raises(ConnectionError, match="simulated crash"):
            publish_artifact(store, T, "llama-ties", out, job_id="job-1")
    assert _numbers(store) == []
    assert list(store.list("acme/llama-ties/v1/")) == []  # the partial files were removed
    assert publish_artifact(store, T, "llama-ties", out, job_id="job-1").version == 2
    assert _numbers(store) == [2]


def test_a_crash_that_cannot_clean_up_is_swept_later(
    store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = make_output(tmp_path / "out")
    with monkeypatch.context() as m:
        _fail_on_nth_put_file(store, 4, m)
        m.setattr(store, "delete_prefix", lambda prefix: 1 / 0)  # the process is gone
        with pytest.raises(ConnectionError):
            publish_artifact(store, T, "llama-ties", out, job_id="job-1")
    assert len(list(store.list("acme/llama-ties/v1/"))) == 3  # leftovers, but invisible
    assert _numbers(store) == []
    assert publish_artifact(store, T, "llama-ties", out, job_id="job-2").version == 2
    assert sweep_incomplete(store, T, "llama-ties", older_than_s=3600) == []  # too recent
    assert sweep_incomplete(store, T, "llama-ties", older_than_s=0) == [1]
    assert list(store.list("acme/llama-ties/v1/")) == []
    assert publish_artifact(store, T, "llama-ties", out, job_id="job-3").version == 3
    assert _numbers(store) == [2, 3]


def test_a_file_that_does_not_match_its_manifest_is_refused(
    store: ObjectStore, tmp_path: Path
) -> None:
    out = make_output(tmp_path / "out", big=6 * MiB)
    for name in ["config.json", "model-big.safetensors"]:  # single PUT and multipart on S3
        data = bytearray((out / name).read_bytes())
        data[len(data) // 2] ^= 1  # same size, other bytes
        original = (out / name).read_bytes()
        (out / name).write_bytes(bytes(data))
        with pytest.raises(ArtifactIntegrityError, match=name) as err:
            publish_artifact(store, T, "m", out, job_id=f"j-{name}")
        assert err.value.file == name
        (out / name).write_bytes(original)
    assert _numbers(store, "m") == []
    assert [k.key for k in store.list("acme/m/v1/")] == []
    assert [k.key for k in store.list("acme/m/v2/")] == []
    assert publish_artifact(store, T, "m", out, job_id="j").version == 3


def test_bad_output_directories_are_refused_before_taking_a_number(
    store: ObjectStore, tmp_path: Path
) -> None:
    with pytest.raises(ManifestError, match=r"no manifest\.json"):
        publish_artifact(store, T, "m", tmp_path, job_id="j")
    out = make_output(tmp_path / "out")
    (out / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match=r"'tokenizer\.json' is listed"):
        publish_artifact(store, T, "m", out, job_id="j")
    (out / "tokenizer.json").write_bytes(b"{} ")
    with pytest.raises(ArtifactIntegrityError, match="3 bytes, the manifest says 2"):
        publish_artifact(store, T, "m", out, job_id="j")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"].append({"path": "../escape", "size": 1, "sha256": "0" * 64})
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="bad file entry"):
        publish_artifact(store, T, "m", out, job_id="j")
    assert list(store.list("")) == []


@pytest.mark.parametrize(
    ("tenant", "name"), [("../x", "m"), ("acme", "Upper"), ("acme", "a/b"), ("", "m")]
)
def test_invalid_tenant_or_name(store: ObjectStore, tmp_path: Path, tenant: str, name: str) -> None:
    with pytest.raises(ArtifactError, match="invalid"):
        publish_artifact(store, tenant, name, tmp_path, job_id="j")
    with pytest.raises(ArtifactError, match="invalid"):
        list_versions(store, tenant, name)


def test_concurrent_publishers_get_distinct_versions(store: ObjectStore, tmp_path: Path) -> None:
    n = 5
    outs = [make_output(tmp_path / f"out{i}", seed=i) for i in range(n)]
    got: list[ArtifactVersion] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def publish(i: int) -> None:
        barrier.wait()
        try:
            got.append(publish_artifact(store, T, "m", outs[i], job_id=f"job-{i}"))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(v.version for v in got) == list(range(1, n + 1))
    assert _numbers(store, "m") == list(range(1, n + 1))
    seeds = {read_manifest(store, T, "m", v.version)["seed"] for v in got}
    assert seeds == set(range(n))  # each version holds its own publisher's files


# -- download integrity --------------------------------------------------------------------


def _tamper(store: ObjectStore, key: str, request: pytest.FixtureRequest) -> None:
    """Overwrite ``key`` behind the store's back with bytes of the same size."""
    size = store.stat(key).size  # type: ignore[union-attr]
    if isinstance(store, LocalObjectStore):
        (store.root / key).write_bytes(b"X" * size)
        return
    server: S3Server = request.getfixturevalue("s3_server")
    server.client().put_object(Bucket=server.bucket, Key=store.prefix + key, Body=b"X" * size)  # type: ignore[attr-defined]


def test_download_names_a_tampered_file(
    store: ObjectStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    v = publish_artifact(store, T, "m", make_output(tmp_path / "out"), job_id="j")
    _tamper(store, v.prefix + "model-00002-of-00002.safetensors", request)
    dest = tmp_path / "dl"
    with pytest.raises(ArtifactIntegrityError) as err:
        download_artifact(store, T, "m", "latest", dest)
    assert "'model-00002-of-00002.safetensors' is corrupt" in str(err.value)
    assert err.value.file == "model-00002-of-00002.safetensors"
    assert not dest.exists() and list(tmp_path.glob(".dl*")) == []


def test_download_reports_a_missing_file(
    store: ObjectStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    v = publish_artifact(store, T, "m", make_output(tmp_path / "out"), job_id="j")
    store.delete_prefix(v.prefix + "config.json")
    with pytest.raises(ArtifactIntegrityError, match=r"'config\.json' listed in the manifest"):
        download_artifact(store, T, "m", 1, tmp_path / "dl")


def test_download_refuses_a_non_empty_target(store: ObjectStore, tmp_path: Path) -> None:
    publish_artifact(store, T, "m", make_output(tmp_path / "out"), job_id="j")
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "x").write_text("keep me")
    with pytest.raises(ArtifactError, match="not empty"):
        download_artifact(store, T, "m", 1, tmp_path / "dl")
    assert (tmp_path / "dl" / "x").read_text() == "keep me"


# -- re-use --------------------------------------------------------------------------------


def test_find_by_recipe_hash(store: ObjectStore, tmp_path: Path) -> None:
    out1 = make_output(tmp_path / "o1", seed=1)
    out2 = make_output(tmp_path / "o2", seed=2)
    digest1 = manifest_recipe_hash(json.loads((out1 / MANIFEST).read_text()))
    digest2 = manifest_recipe_hash(json.loads((out2 / MANIFEST).read_text()))
    assert digest1 != digest2
    assert find_by_recipe_hash(store, T, "m", digest1) is None
    publish_artifact(store, T, "m", out1, job_id="a")
    publish_artifact(store, T, "m", out2, job_id="b")
    publish_artifact(store, T, "m", out1, job_id="c")  # same recipe again: v3
    assert find_by_recipe_hash(store, T, "m", digest1).version == 1  # type: ignore[union-attr]
    assert find_by_recipe_hash(store, T, "m", digest2).version == 2  # type: ignore[union-attr]
    # the index is an optimisation: without it the manifests are scanned (newest first)
    store.delete_prefix("acme/m/recipes/")
    assert find_by_recipe_hash(store, T, "m", digest1).version == 3  # type: ignore[union-attr]
    # what the service computes at submission matches what the manifest yields
    assert digest1 == compute_recipe_hash(
        kind="merge",
        recipe={"base_model": "org/base@" + "a" * 40, "merge_method": "ties"},
        parents=["org/base@" + "a" * 40],
        seed=1,
    )


def test_explicit_recipe_hash_is_recorded(store: ObjectStore, tmp_path: Path) -> None:
    digest = hashlib.sha256(b"pinned recipe").hexdigest()
    publish_artifact(store, T, "m", make_output(tmp_path / "o"), job_id="a", recipe_hash=digest)
    assert read_manifest(store, T, "m", 1)["artifact"]["recipe_hash"] == digest
    assert find_by_recipe_hash(store, T, "m", digest).version == 1  # type: ignore[union-attr]
    with pytest.raises(ArtifactError, match="not a hex sha256"):
        publish_artifact(store, T, "m", make_output(tmp_path / "p"), job_id="b", recipe_hash="x")


def test_republishing_the_same_job_returns_its_version(store: ObjectStore, tmp_path: Path) -> None:
    out = make_output(tmp_path / "o")
    first = publish_artifact(store, T, "m", out, job_id="job-7")
    again = publish_artifact(store, T, "m", out, job_id="job-7")  # a redelivered task
    assert again.version == first.version == 1
    assert _numbers(store, "m") == [1]
    assert [k.key for k in store.list("acme/m/versions/")] == ["acme/m/versions/v1.claim"]


# -- one job, one version, whatever the crash point ----------------------------------------


class Crash(Exception):
    """The publishing process died here: its store refuses everything from now on."""


# Where a publish dies, just after the named write succeeded: (name, does the write match).
CRASH_POINTS: dict[str, Callable[[str, int], bool]] = {
    "after claiming a version number": lambda key, _n: key.endswith(".claim"),
    "after some files": lambda _key, n: n == 2,
    "after every file": lambda _key, n: n == 6,
    "after the job's commit": lambda key, _n: "/jobs/" in key,
    "after the manifest": lambda key, _n: key.endswith("/manifest.json"),
    "after the recipe index": lambda key, _n: "/recipes/" in key,
}
COMMITTED = {"after the job's commit", "after the manifest", "after the recipe index"}


def _crash_after(store: ObjectStore, point: str, m: pytest.MonkeyPatch) -> None:
    """Make ``store`` die right after the write ``point`` names (n counts the files)."""
    matches = CRASH_POINTS[point]
    state = {"files": 0, "dead": False}

    def guard(name: str) -> Callable[..., Any]:
        real: Callable[..., Any] = getattr(store, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if state["dead"]:
                raise Crash(f"{name} after the crash")
            result = real(*args, **kwargs)
            if name == "put_file":
                state["files"] += 1
            if name in ("put_file", "put_bytes") and matches(args[0], state["files"]):
                state["dead"] = True
                raise Crash(f"died {point}")
            return result

        return call

    for name in ("put_file", "put_bytes", "get_bytes", "stat", "list", "list_prefixes"):
        m.setattr(store, name, guard(name))
    m.setattr(store, "delete_prefix", guard("delete_prefix"))


def _stored_files(store: ObjectStore, version: int, tmp_path: Path) -> dict[str, bytes]:
    """The version's files as downloaded (every sha256 checked against its manifest)."""
    dest = download_artifact(store, T, "m", version, tmp_path / f"dl-{version}")
    return {p.name: p.read_bytes() for p in dest.iterdir() if p.name != MANIFEST}


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_a_job_publishes_exactly_one_version_whatever_the_crash_point(
    store: ObjectStore, tmp_path: Path, point: str
) -> None:
    first = make_output(tmp_path / "attempt-1", seed=7)
    # The retry merges again: same recipe, but other bytes (e.g. another device's rounding).
    retry_files = {"model.safetensors": b"the retry's weights " * 50, "config.json": b"{}"}
    retry = make_output(tmp_path / "attempt-2", seed=7, files=retry_files)
    with pytest.MonkeyPatch.context() as m:
        _crash_after(store, point, m)
        with pytest.raises(Crash):
            publish_artifact(store, T, "m", first, job_id="job-1")

    version = publish_artifact(store, T, "m", retry, job_id="job-1")

    assert _numbers(store, "m") == [version.version]  # exactly one complete version
    manifest = read_manifest(store, T, "m", version.version)
    assert manifest["artifact"]["job_id"] == "job-1"
    published_from = first if point in COMMITTED else retry
    expected = {p.name: p.read_bytes() for p in published_from.iterdir() if p.name != MANIFEST}
    assert _stored_files(store, version.version, tmp_path) == expected
    # a committed version is completed, not replaced; before the commit the retry publishes
    assert version.version == (1 if point in COMMITTED else 2)
    digest = manifest["artifact"]["recipe_hash"]
    assert find_by_recipe_hash(store, T, "m", digest) == version
    # and however often the job is retried again, or the leftovers swept, that stays so
    assert publish_artifact(store, T, "m", retry, job_id="job-1").version == version.version
    sweep_incomplete(store, T, "m", older_than_s=0)
    assert _numbers(store, "m") == [version.version]
    assert _stored_files(store, version.version, tmp_path / "again") == expected
    assert publish_artifact(store, T, "m", retry, job_id="job-1").version == version.version
    assert _numbers(store, "m") == [version.version]


def test_a_sweep_voids_a_commit_never_completed_and_the_retry_publishes_anew(
    store: ObjectStore, tmp_path: Path
) -> None:
    out = make_output(tmp_path / "out")
    with pytest.MonkeyPatch.context() as m:
        _crash_after(store, "after the job's commit", m)
        with pytest.raises(Crash):
            publish_artifact(store, T, "m", out, job_id="job-1")
    assert _numbers(store, "m") == []  # committed, but not visible yet

    assert sweep_incomplete(store, T, "m", older_than_s=0) == [1]

    assert list(store.list("acme/m/jobs/")) == []  # the commit went before the files
    assert list(store.list("acme/m/v1/")) == []
    assert publish_artifact(store, T, "m", out, job_id="job-1").version == 2
    assert _numbers(store, "m") == [2]
    _stored_files(store, 2, tmp_path)


def test_a_commit_whose_files_are_gone_is_not_completed(store: ObjectStore, tmp_path: Path) -> None:
    out = make_output(tmp_path / "out")
    with pytest.MonkeyPatch.context() as m:
        _crash_after(store, "after the job's commit", m)
        with pytest.raises(Crash):
            publish_artifact(store, T, "m", out, job_id="job-1")
    store.delete_prefix("acme/m/v1/config.json")  # lost behind the publisher's back

    version = publish_artifact(store, T, "m", out, job_id="job-1")

    assert (version.version, _numbers(store, "m")) == (2, [2])
    _stored_files(store, 2, tmp_path)


def test_two_attempts_of_one_job_publishing_at_once_make_one_version(
    store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow attempt (presumed lost) is about to commit when its successor publishes.
    slow_out = make_output(tmp_path / "slow", seed=3)
    fast_out = make_output(tmp_path / "fast", seed=3, files={"model.safetensors": b"fast"})
    at_commit, resume = threading.Event(), threading.Event()
    real_put_bytes = store.put_bytes
    slow_thread: list[threading.Thread] = []

    def put_bytes(key: str, data: bytes, *, if_absent: bool = False) -> Any:
        if "/jobs/" in key and threading.current_thread() in slow_thread:
            at_commit.set()
            assert resume.wait(30)
        return real_put_bytes(key, data, if_absent=if_absent)

    monkeypatch.setattr(store, "put_bytes", put_bytes)
    got: list[ArtifactVersion] = []
    slow = threading.Thread(
        target=lambda: got.append(publish_artifact(store, T, "m", slow_out, job_id="job-1"))
    )
    slow_thread.append(slow)
    slow.start()
    assert at_commit.wait(30)
    fast = publish_artifact(store, T, "m", fast_out, job_id="job-1")
    resume.set()
    slow.join(30)

    assert got == [fast] and fast.version == 2
    assert _numbers(store, "m") == [2]
    assert list(store.list("acme/m/v1/")) == []  # the slow attempt took its files back
    assert _stored_files(store, 2, tmp_path) == {"model.safetensors": b"fast"}


# -- with the real merge engine ------------------------------------------------------------


def test_publish_a_real_merge_output(llama_family: dict[str, Path], tmp_path: Path) -> None:
    from schemas.recipe import parse_recipe
    from workers.merge.engine import run_merge

    recipe = parse_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(llama_family["base"]),
            "models": [{"model": str(llama_family["ft1"])}, {"model": str(llama_family["ft2"])}],
        }
    )
    out = run_merge(recipe, tmp_path / "merged", seed=5).out_dir
    store = LocalObjectStore(tmp_path / "store")
    v = publish_artifact(store, T, "tiny-llama", out, job_id="job-1")
    dest = download_artifact(store, T, "tiny-llama", v.version, tmp_path / "dl")
    for f in out.iterdir():
        if f.name != MANIFEST:
            assert (dest / f.name).read_bytes() == f.read_bytes(), f.name
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["artifact"]["recipe_hash"] == manifest_recipe_hash(manifest)
    assert {e["path"] for e in manifest["files"]} == {
        f.name for f in out.iterdir() if f.name != MANIFEST
    }
