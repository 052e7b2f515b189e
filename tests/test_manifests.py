"""The one manifest model (schemas.manifests): what every writer produces and every reader
checks — merge, edit and upload outputs, the artifact store and the client."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from infra.artifacts import folder_files, write_manifest
from schemas.manifests import MANIFEST, MANIFEST_FORMAT, Manifest


def entry(path: str, data: bytes = b"x") -> dict[str, object]:
    return {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_manifest_keeps_what_a_writer_adds_and_writes_strict_json_last(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub" / "b.json").write_bytes(b"{}")
    files = folder_files(tmp_path)
    assert [(f.path, f.size, f.sha256) for f in files] == [
        ("a.bin", 3, hashlib.sha256(b"abc").hexdigest()),
        ("sub/b.json", 2, hashlib.sha256(b"{}").hexdigest()),
    ]
    manifest = Manifest(format=MANIFEST_FORMAT, kind="edit", files=files, metrics={"x": 1.5})
    written = write_manifest(tmp_path, manifest)
    on_disk = json.loads((tmp_path / MANIFEST).read_text())
    assert on_disk == written
    assert list(on_disk) == ["format", "kind", "files", "metrics"]  # only what was given
    assert [f.path for f in folder_files(tmp_path)] == ["a.bin", "sub/b.json"]  # not itself
    # NaN and infinity are not JSON: they are written as null (the API serves it as is)
    text = Manifest(kind="edit", files=files, metrics={"x": float("nan")}).to_json()
    assert json.loads(text)["metrics"] == {"x": None} and "NaN" not in text


@pytest.mark.parametrize(
    "path",
    ["", "/abs", "../up", "a/../b", "a//b", "./a", "a\\b", "a\x00b", MANIFEST],
)
def test_a_file_path_that_could_escape_or_is_the_manifest_is_refused(path: str) -> None:
    with pytest.raises(ValidationError):
        Manifest(files=[entry(path)])


def test_digests_are_hex_lower_cased_sizes_not_negative_and_paths_listed_once() -> None:
    upper = entry("a").copy()
    upper["sha256"] = str(upper["sha256"]).upper()
    assert Manifest(files=[upper]).files[0].sha256 == entry("a")["sha256"]
    for bad in ({**entry("a"), "sha256": "xyz"}, {**entry("a"), "size": -1}):
        with pytest.raises(ValidationError):
            Manifest(files=[bad])
    with pytest.raises(ValidationError, match="listed twice"):
        Manifest(files=[entry("a"), entry("a", b"y")])
    with pytest.raises(ValidationError):
        Manifest(files=[])
