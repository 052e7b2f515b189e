"""A fresh object store of either kind for one test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from testbed.s3 import S3Server


def make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path, **s3_kwargs: Any) -> Any:
    """A fresh, empty ObjectStore of ``kind`` ("local" or "s3") for one test.

    The S3 server is only started when an "s3" store is asked for. ``s3_kwargs`` go to
    ``S3ObjectStore`` (e.g. a small ``part_size`` to exercise multipart uploads quickly).
    """
    if kind == "local":
        from infra.storage import LocalObjectStore

        return LocalObjectStore(tmp_path / "store")
    if kind == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        return server.store(**s3_kwargs)
    raise ValueError(f"unknown store kind {kind!r}")
