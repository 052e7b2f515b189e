"""A small local Hugging Face Hub endpoint for tests.

It answers the requests that ``huggingface_hub`` 2.x makes for ``HfApi.model_info``,
``HfApi.list_repo_tree``, ``snapshot_download`` and ``hf_hub_download``, so tests exercise the
real client code without network access:

- ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}`` (``?blobs=true`` adds
  sizes, blob ids and LFS sha256 to ``siblings``)
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=true`` with cursor pagination through a
  ``Link: <...>; rel="next"`` header (see ``HubServer.tree_page_size``)
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{file}`` with ``X-Repo-Commit``, ``ETag``,
  ``X-Linked-Etag`` / ``X-Linked-Size`` (LFS files), ``Content-Length`` and ``Range`` support.
  With ``lfs_redirect=True`` LFS files answer ``302`` to a "CDN" URL on another host name
  (``localhost`` instead of ``127.0.0.1``), as the real Hub does; the client then downloads from
  there without its ``Authorization`` header.

Errors carry the ``X-Error-Code`` header the client maps to its exceptions: ``RepoNotFound``
(unknown repo: 404; private repo without a token: 401, with a wrong token: 404), ``GatedRepo``
(gated repo files without the right token: 401 anonymous, 403 authenticated; a gated repo's
metadata and file list stay public, as on the real Hub), ``RevisionNotFound`` and
``EntryNotFound``.

It also takes pushes, answering what ``HfApi.create_repo``, ``create_branch`` and
``create_commit`` send (tokens allowed to write are registered with ``grant_write``):

- ``POST /api/repos/create`` (``visibility: private`` makes the repo readable with the creating
  token only; an existing repo is a 409), ``POST /api/models/{repo}/branch/{branch}``
- ``POST /api/validate-yaml`` (README.md front matter, checked before anything is uploaded)
- ``POST /api/models/{repo}/preupload/{rev}``: ``uploadMode`` ``lfs`` for the extensions and sizes
  above, ``regular`` otherwise, and the current ``oid`` of each path (unchanged files are skipped
  by the client)
- the Git LFS batch API, basic transfer only: ``POST /{repo}.git/info/lfs/objects/batch`` gives
  a one-time upload URL (``PUT /_lfs/{ticket}``, no Authorization, the body must match the sha256
  and size) and a verify URL; an object the repo already has gets no actions
- ``POST /api/models/{repo}/commit/{branch}``: the NDJSON body (``header``, ``file`` with base64
  content, ``lfsFile`` naming an uploaded object, ``deletedFile``, ``deletedFolder``). A binary
  file sent as a regular file is refused, as by the Hub. The new commit is then served by the
  read API above.

There is no Xet storage here: the ``hub`` fixture (tests/conftest.py) sets
``HF_HUB_DISABLE_XET`` (huggingface_hub 2.x picks Xet on the client side whenever ``hf_xet``
is installed), so uploads use plain LFS.

Every request is recorded (``HubServer.requests``) so tests can check which files were fetched.

Usage::

    def test_x(hub, tmp_path):
        sha = hub.add_repo("org/name", folder)            # or a {name: bytes} mapping
        sha2 = hub.add_repo("org/name", other_folder)     # second commit, "main" moves
        hub.grant_write("hf_secret", ["org"])             # then HfApi(token="hf_secret") pushes
        hub.corrupt("org/name", "model.safetensors")      # serve other bytes than advertised
        assert "training_args.bin" not in hub.file_requests("org/name")
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

__all__ = ["HubServer", "RequestRecord"]

# Extensions the Hub's default .gitattributes stores with Git LFS (subset) and the size above
# which any file goes to LFS.
_LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".model",
    ".onnx",
    ".gguf",
    ".npy",
    ".npz",
    ".pkl",
    ".pickle",
    ".zip",
    ".gz",
    ".tar",
)
_LFS_MIN_SIZE = 10 * 1024 * 1024
_POINTER_SIZE = 134  # size of a Git LFS pointer file, as the Hub reports it
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX_PREFIX = re.compile(r"^[0-9a-f]{7,40}$")


def _is_lfs(name: str, size: int) -> bool:
    return name.endswith(_LFS_SUFFIXES) or size >= _LFS_MIN_SIZE


# The first commit of a repo made through the API, as on the Hub (abridged).
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in _LFS_SUFFIXES)


@dataclass(frozen=True)
class _File:
    name: str
    data: bytes
    size: int
    sha256: str
    blob_id: str  # git blob sha1 of the advertised content
    lfs: bool

    @classmethod
    def from_bytes(cls, name: str, data: bytes, *, lfs: bool | None = None) -> _File:
        """``lfs``: how the file is stored; None applies the Hub's default rule (_is_lfs)."""
        blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        lfs = _is_lfs(name, len(data)) if lfs is None else lfs
        return cls(name, data, len(data), hashlib.sha256(data).hexdigest(), blob_id, lfs)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class _Repo:
    repo_id: str
    commits: dict[str, dict[str, _File]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False
    private_token: str | None = None
    # (commit, file name) -> bytes served instead of the advertised content
    served_override: dict[tuple[str, str], bytes] = field(default_factory=dict)
    # commits made through the write API: sha -> (summary, parent sha)
    history: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    @property
    def private(self) -> bool:
        return self.private_token is not None and not self.gated

    def resolve(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        if _HEX40.match(rev) and rev in self.commits:
            return rev
        if _HEX_PREFIX.match(rev):
            found = [sha for sha in self.commits if sha.startswith(rev)]
            if len(found) == 1:
                return found[0]
        return None


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str  # URL path, percent-decoded, without the query string
    query: dict[str, str]
    status: int
    authorized: bool  # an Authorization header was sent


class HubServer:
    """A fake Hugging Face Hub on ``127.0.0.1`` serving repositories registered in memory."""

    def __init__(self, *, lfs_redirect: bool = False, tree_page_size: int = 1000) -> None:
        self.lfs_redirect = lfs_redirect
        self.tree_page_size = tree_page_size
        self.cache_dir: Path | None = None  # set by the ``hub`` fixture (tests/conftest.py)
        self._repos: dict[str, _Repo] = {}
        self._requests: list[RequestRecord] = []
        self._failures: list[list[Any]] = []  # [path substring, status, remaining or None]
        # write API: token -> namespaces it may write to (None: any)
        self._writers: dict[str, frozenset[str] | None] = {}
        self._lfs_store: dict[tuple[str, str], bytes] = {}  # (repo, sha256) -> content
        self._lfs_tickets: dict[str, tuple[str, str, int]] = {}  # ticket -> (repo, oid, size)
        self._lfs_uploads: list[tuple[str, str]] = []  # (repo, oid) received by PUT
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> HubServer:
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="fake-hf-hub",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ----------------------------------------------------------------- repos

    def add_repo(
        self,
        repo_id: str,
        files: Path | str | Mapping[str, bytes],
        *,
        branch: str = "main",
        gated: bool | None = None,
        private_token: str | None = None,
    ) -> str:
        """Add a commit with ``files`` (a folder, read recursively, or a name -> bytes mapping).

        Returns the commit sha (sha1 of the repo id and the file list with sizes and hashes, so the
        same content gives the same commit) and points ``branch`` at it. Calling it again for the
        same repo adds a revision and moves the branch; older commits stay reachable by sha.

        ``private_token``: the bearer token that grants access. Without ``gated`` the repo is
        private (everything needs the token); with ``gated=True`` metadata and the file list are
        public but file downloads need it. ``None`` for ``gated`` keeps the repo's setting
        (``False`` for a new repo); a given ``private_token`` replaces the repo's token.
        """
        if isinstance(files, Mapping):
            content = {name: bytes(data) for name, data in files.items()}
        else:
            root = Path(files)
            if not root.is_dir():
                raise ValueError(f"{root} is not a directory")
            content = {
                p.relative_to(root).as_posix(): p.read_bytes()
                for p in sorted(root.rglob("*"))
                if p.is_file() and ".git" not in p.relative_to(root).parts
            }
        tree = {name: _File.from_bytes(name, data) for name, data in sorted(content.items())}
        digest = hashlib.sha1(repo_id.encode())
        for f in tree.values():
            digest.update(f"\n{f.name}\0{f.size}\0{f.sha256}".encode())
        sha = digest.hexdigest()
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo(repo_id))
            repo.commits.setdefault(sha, tree)
            repo.refs[branch] = sha
            if gated is not None:
                repo.gated = gated
            if private_token is not None:
                repo.private_token = private_token
        return sha

    def set_ref(self, repo_id: str, ref: str, sha: str) -> None:
        """Point a branch or tag at an existing commit."""
        with self._lock:
            repo = self._repos[repo_id]
            if sha not in repo.commits:
                raise KeyError(f"{repo_id} has no commit {sha}")
            repo.refs[ref] = sha

    def delete_repo(self, repo_id: str) -> None:
        with self._lock:
            self._repos.pop(repo_id, None)

    def commit_of(self, repo_id: str, revision: str = "main") -> str:
        with self._lock:
            sha = self._repos[repo_id].resolve(revision)
        if sha is None:
            raise KeyError(f"{repo_id} has no revision {revision}")
        return sha

    def corrupt(
        self,
        repo_id: str,
        filename: str,
        data: bytes | None = None,
        *,
        revision: str = "main",
    ) -> bytes:
        """Serve ``data`` for ``filename`` while still advertising the original size and hashes.

        Without ``data`` the last byte is flipped (same size, different sha256). Returns the
        bytes now served.
        """
        with self._lock:
            repo = self._repos[repo_id]
            sha = repo.resolve(revision)
            if sha is None:
                raise KeyError(f"{repo_id} has no revision {revision}")
            original = repo.commits[sha][filename].data
            if data is None:
                data = original[:-1] + bytes([original[-1] ^ 0xFF]) if original else b"\0"
            repo.served_override[(sha, filename)] = data
        return data

    def restore(self, repo_id: str, filename: str, *, revision: str = "main") -> None:
        """Undo ``corrupt``: serve the advertised content again."""
        with self._lock:
            repo = self._repos[repo_id]
            sha = repo.resolve(revision)
            repo.served_override.pop((sha or "", filename), None)

    def fail(self, path_contains: str, status: int, *, times: int | None = None) -> None:
        """Answer requests whose path contains ``path_contains`` with ``status``.

        ``times``: how many requests fail (``None``: all of them).
        """
        with self._lock:
            self._failures.append([path_contains, status, times])

    # ----------------------------------------------------------------- write API

    def grant_write(self, token: str, namespaces: Iterable[str] | None = None) -> None:
        """Let ``token`` create repos and commit in ``namespaces`` (None: everywhere).

        Any other bearer token is refused by the write endpoints with 401 "Invalid
        credentials in Authorization header", as the Hub answers an unknown token.
        """
        with self._lock:
            self._writers[token] = None if namespaces is None else frozenset(namespaces)

    def is_private(self, repo_id: str) -> bool:
        with self._lock:
            return self._repos[repo_id].private

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bool]:
        """The files of a revision: name -> stored with Git LFS."""
        sha = self.commit_of(repo_id, revision)
        with self._lock:
            return {name: f.lfs for name, f in self._repos[repo_id].commits[sha].items()}

    def commit_message(self, repo_id: str, sha: str) -> str | None:
        """The summary of a commit made through the write API (None for ``add_repo`` ones)."""
        with self._lock:
            entry = self._repos[repo_id].history.get(sha)
        return entry[0] if entry else None

    def commits(self, repo_id: str, branch: str = "main") -> list[str]:
        """The write-API commits reachable from ``branch``, newest first."""
        with self._lock:
            repo = self._repos[repo_id]
            out: list[str] = []
            sha: str | None = repo.refs.get(branch)
            while sha is not None and sha in repo.history:
                out.append(sha)
                sha = repo.history[sha][1]
        return out

    def lfs_uploads(self, repo_id: str) -> list[str]:
        """sha256 of each object uploaded to ``repo_id`` through the LFS basic transfer."""
        with self._lock:
            return [oid for repo, oid in self._lfs_uploads if repo == repo_id]

    # ----------------------------------------------------------------- request log

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._requests)

    def reset_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def count(self, *, method: str | None = None, path_contains: str = "") -> int:
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method) and path_contains in r.path
        )

    def file_requests(self, repo_id: str, *, method: str | None = None) -> Counter[str]:
        """How often each file of ``repo_id`` was requested (HEAD or GET on /resolve, CDN GETs)."""
        names: Counter[str] = Counter()
        prefix = f"/{repo_id}/resolve/"
        for r in self.requests:
            if method is not None and r.method != method:
                continue
            if r.path.startswith(prefix):
                rest = r.path[len(prefix) :]
                names[rest.split("/", 1)[1] if "/" in rest else ""] += 1
            elif r.path.startswith("/_cdn/") and r.query.get("repo") == repo_id:
                names[r.query.get("file", "")] += 1
        return names

    def downloaded(self, repo_id: str) -> set[str]:
        """Names of the files of ``repo_id`` whose content was fetched (GET)."""
        return set(self.file_requests(repo_id, method="GET"))

    # ----------------------------------------------------------------- internals

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._requests.append(record)

    def _injected_failure(self, path: str) -> int | None:
        with self._lock:
            for failure in self._failures:
                needle, status, remaining = failure
                if needle in path and (remaining is None or remaining > 0):
                    if remaining is not None:
                        failure[2] = remaining - 1
                    return int(status)
        return None


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer  # bound by HubServer.start
    protocol_version = "HTTP/1.1"
    server_version = "fake-hf-hub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -------------------------------------------------------------- plumbing

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        raw_path = parts.path
        self._query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self._method = method
        self._status = 500
        decoded = unquote(raw_path)
        # Read the whole body first: the connection is kept alive, whatever the answer.
        self._body = self._read_body() if method in ("POST", "PUT") else b""
        try:
            forced = self.hub._injected_failure(decoded)
            if forced is not None:
                self._error(forced, None, f"injected failure {forced}")
            elif method in ("POST", "PUT"):
                self._write(method, raw_path)
            elif raw_path.startswith("/api/models/"):
                self._api(raw_path[len("/api/models/") :].split("/"))
            elif raw_path.startswith("/_cdn/"):
                self._cdn()
            else:
                self._resolve(raw_path.lstrip("/").split("/"))
        finally:
            self.hub._record(
                RequestRecord(
                    method=method,
                    path=decoded,
                    query=dict(self._query),
                    status=self._status,
                    authorized=self.headers.get("Authorization") is not None,
                )
            )

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer ") :].strip() if auth.startswith("Bearer ") else None

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        *,
        content_type: str = "application/json",
        content_length: int | None = None,
    ) -> None:
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header(
            "Content-Length", str(len(body) if content_length is None else content_length)
        )
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self._method != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send(200, json.dumps(payload).encode(), headers)

    def _error(
        self, status: int, code: str | None, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        extra = dict(headers or {})
        if code is not None:
            extra["X-Error-Code"] = code
        extra["X-Error-Message"] = message
        self._send(status, json.dumps({"error": message}).encode(), extra)

    def _repo_or_error(self, repo_id: str, *, files: bool) -> _Repo | None:
        """The repo if the request may see it; otherwise answer the error the Hub gives."""
        with self.hub._lock:
            repo = self.hub._repos.get(repo_id)
        token = self._token()
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if repo.private_token is None or token == repo.private_token:
            if repo.gated and repo.private_token is None and files:
                pass  # gated with no token configured: nobody gets in
            else:
                return repo
        if repo.gated:
            if not files:
                return repo  # metadata and the file list of a gated repo are public
            status = 401 if token is None else 403
            self._error(
                status,
                "GatedRepo",
                f"Access to model {repo_id} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in.",
            )
            return None
        # private: anonymous gets 401, an authenticated user without access 404
        self._error(401 if token is None else 404, "RepoNotFound", "Repository not found")
        return None

    def _commit_or_error(self, repo: _Repo, rev: str) -> str | None:
        with self.hub._lock:
            sha = repo.resolve(rev)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha

    # -------------------------------------------------------------- /api/models

    def _api(self, segments: list[str]) -> None:
        if len(segments) < 2 or not segments[0] or not segments[1]:
            self._error(404, None, "Not found")
            return
        repo_id = f"{unquote(segments[0])}/{unquote(segments[1])}"
        rest = segments[2:]
        if self._method != "GET":
            self._error(405, None, "Method not allowed")
            return
        if not rest or rest == [""]:
            self._model_info(repo_id, "main")
        elif rest[0] == "revision" and len(rest) >= 2:
            self._model_info(repo_id, unquote("/".join(rest[1:])))
        elif rest[0] == "tree" and len(rest) >= 2:
            self._tree(repo_id, unquote(rest[1]), unquote("/".join(rest[2:])).strip("/"))
        else:
            self._error(404, None, "Not found")

    def _model_info(self, repo_id: str, rev: str) -> None:
        repo = self._repo_or_error(repo_id, files=False)
        if repo is None:
            return
        sha = self._commit_or_error(repo, rev)
        if sha is None:
            return
        with self.hub._lock:
            tree = dict(repo.commits[sha])
        blobs = self._query.get("blobs", "").lower() == "true"
        siblings: list[dict[str, Any]] = []
        for f in tree.values():
            entry: dict[str, Any] = {"rfilename": f.name}
            if blobs:
                entry["size"] = f.size
                entry["blobId"] = f.blob_id
                if f.lfs:
                    entry["lfs"] = {
                        "sha256": f.sha256,
                        "size": f.size,
                        "pointerSize": _POINTER_SIZE,
                    }
            siblings.append(entry)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        self._json(
            {
                "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": sha,
                "lastModified": now,
                "createdAt": now,
                "private": repo.private,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "library_name": "transformers",
                "siblings": siblings,
                "usedStorage": sum(f.size for f in tree.values()),
            }
        )

    def _tree(self, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo_or_error(repo_id, files=False)
        if repo is None:
            return
        sha = self._commit_or_error(repo, rev)
        if sha is None:
            return
        with self.hub._lock:
            tree = dict(repo.commits[sha])
        recursive = self._query.get("recursive", "").lower() == "true"
        prefix = f"{path}/" if path else ""
        dirs: set[str] = set()
        for name in tree:
            parts = name.split("/")[:-1]
            dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        if path and path not in dirs:
            if path in tree:  # the Hub lists a file path as itself
                prefix = ""
            else:
                self._error(
                    404, "EntryNotFound", f"{path} does not exist on {rev}", {"X-Repo-Commit": sha}
                )
                return
        entries: list[dict[str, Any]] = []
        for d in sorted(dirs):
            if d.startswith(prefix) and (recursive or "/" not in d[len(prefix) :]):
                entries.append(
                    {
                        "type": "directory",
                        "oid": hashlib.sha1(d.encode()).hexdigest(),
                        "size": 0,
                        "path": d,
                    }
                )
        for f in tree.values():
            if prefix == "" and path and f.name != path:
                continue
            if not f.name.startswith(prefix):
                continue
            if not recursive and "/" in f.name[len(prefix) :]:
                continue
            entry: dict[str, Any] = {
                "type": "file",
                "oid": f.blob_id,
                "size": f.size,
                "path": f.name,
            }
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": _POINTER_SIZE}
            entries.append(entry)
        start = int(self._query.get("cursor", "0") or 0)
        page_size = max(1, self.hub.tree_page_size)
        page = entries[start : start + page_size]
        headers: dict[str, str] = {}
        if start + page_size < len(entries):
            query = {k: v for k, v in self._query.items() if k != "cursor"}
            query["cursor"] = str(start + page_size)
            next_url = f"{self.hub.url}{urlsplit(self.path).path}?{urlencode(query)}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._json(page, headers)

    # -------------------------------------------------------------- /resolve

    def _resolve(self, segments: list[str]) -> None:
        if len(segments) < 5 or segments[2] != "resolve":
            self._error(404, None, "Not found")
            return
        repo_id = f"{unquote(segments[0])}/{unquote(segments[1])}"
        rev = unquote(segments[3])
        filename = unquote("/".join(segments[4:]))
        repo = self._repo_or_error(repo_id, files=True)
        if repo is None:
            return
        sha = self._commit_or_error(repo, rev)
        if sha is None:
            return
        with self.hub._lock:
            f = repo.commits[sha].get(filename)
            served = repo.served_override.get((sha, filename))
        if f is None:
            self._error(
                404, "EntryNotFound", f"{filename} does not exist on {rev}", {"X-Repo-Commit": sha}
            )
            return
        data = f.data if served is None else served
        headers = {"X-Repo-Commit": sha, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes"}
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        if f.lfs and self.hub.lfs_redirect:
            query = urlencode({"repo": repo_id, "commit": sha, "file": filename})
            headers["Location"] = f"http://localhost:{self.hub.port}/_cdn/{f.sha256}?{query}"
            self._send(302, b"", headers, content_type="text/plain")
            return
        self._serve_bytes(data, headers)

    def _cdn(self) -> None:
        repo_id = self._query.get("repo", "")
        sha = self._query.get("commit", "")
        filename = self._query.get("file", "")
        with self.hub._lock:
            repo = self.hub._repos.get(repo_id)
            f = repo.commits.get(sha, {}).get(filename) if repo else None
            served = repo.served_override.get((sha, filename)) if repo else None
        if f is None:
            self._send(403, b"<Error>AccessDenied</Error>", content_type="application/xml")
            return
        data = f.data if served is None else served
        self._serve_bytes(data, {"ETag": f'"{f.sha256}"', "Accept-Ranges": "bytes"})

    def _serve_bytes(self, data: bytes, headers: dict[str, str]) -> None:
        rng = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip()) if rng else None
        if match and (match.group(1) or match.group(2)):
            total = len(data)
            if match.group(1):
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else total - 1
            else:  # suffix range: the last N bytes
                start = max(0, total - int(match.group(2)))
                end = total - 1
            end = min(end, total - 1)
            if start >= total or start > end:
                self._send(
                    416,
                    b"",
                    {**headers, "Content-Range": f"bytes */{total}"},
                    content_type="application/octet-stream",
                )
                return
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{total}"}
            self._send(206, data[start : end + 1], headers, content_type="application/octet-stream")
            return
        self._send(200, data, headers, content_type="application/octet-stream")

    # -------------------------------------------------------------- write API

    def _write(self, method: str, raw_path: str) -> None:
        path = unquote(raw_path)
        segments = raw_path.lstrip("/").split("/")
        if method == "PUT" and path.startswith("/_lfs/"):
            self._lfs_put(path[len("/_lfs/") :])
        elif method != "POST":
            self._error(405, None, "Method not allowed")
        elif path == "/api/repos/create":
            self._create_repo()
        elif path == "/api/validate-yaml":
            self._validate_yaml()
        elif path.endswith(".git/info/lfs/objects/batch") and len(segments) == 6:
            self._lfs_batch(f"{unquote(segments[0])}/{unquote(segments[1])[: -len('.git')]}")
        elif path.endswith(".git/info/lfs/objects/verify") and len(segments) == 6:
            self._lfs_verify(f"{unquote(segments[0])}/{unquote(segments[1])[: -len('.git')]}")
        elif raw_path.startswith("/api/models/") and len(segments) >= 6:
            repo_id = f"{unquote(segments[2])}/{unquote(segments[3])}"
            action, rev = segments[4], unquote("/".join(segments[5:]))
            if action == "preupload":
                self._preupload(repo_id, rev)
            elif action == "commit":
                self._commit(repo_id, rev)
            elif action == "branch":
                self._create_branch(repo_id, rev)
            else:
                self._error(404, None, "Not found")
        else:
            self._error(404, None, "Not found")

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body or b"{}")
        except ValueError:
            return None

    def _writer_or_error(self, namespace: str, what: str) -> str | None:
        """The bearer token if it may write to ``namespace``; otherwise answer 401/403."""
        token = self._token()
        with self.hub._lock:
            known = token in self.hub._writers
            namespaces = self.hub._writers.get(token or "")
        if token is None:
            self._error(401, None, "You must be authenticated to do this")
            return None
        if not known:
            self._error(401, None, "Invalid credentials in Authorization header")
            return None
        if namespaces is not None and namespace not in namespaces:
            self._error(403, None, f"You don't have the rights to {what} under '{namespace}'")
            return None
        return token

    def _writable_repo_or_error(self, repo_id: str) -> _Repo | None:
        if self._writer_or_error(repo_id.split("/")[0], f"write to {repo_id}") is None:
            return None
        with self.hub._lock:
            repo = self.hub._repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _create_repo(self) -> None:
        body = self._json_body()
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            self._error(400, None, "a JSON object with 'name' is required")
            return
        if body.get("type", "model") != "model":
            self._error(400, None, "this test Hub only has model repos")
            return
        namespace = body.get("organization") or "user"
        repo_id = f"{namespace}/{body['name']}"
        token = self._writer_or_error(namespace, "create a model")
        if token is None:
            return
        url = f"{self.hub.url}/{repo_id}"
        with self.hub._lock:
            exists = repo_id in self.hub._repos
        if exists:
            self._send(
                409,
                json.dumps({"error": "You already created this model repo", "url": url}).encode(),
            )
            return
        private = body.get("visibility") == "private" or body.get("private") is True
        self.hub.add_repo(
            repo_id,
            {".gitattributes": GITATTRIBUTES.encode()},
            private_token=token if private else None,
        )
        self._json({"url": url, "name": repo_id, "id": hashlib.md5(repo_id.encode()).hexdigest()})

    def _validate_yaml(self) -> None:
        import yaml

        body = self._json_body()
        content = body.get("content") if isinstance(body, dict) else None
        if not isinstance(content, str):
            self._error(400, None, "'content' is required")
            return
        errors: list[dict[str, str]] = []
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        if match:
            try:
                meta = yaml.safe_load(match.group(1))
            except yaml.YAMLError as e:
                meta, errors = None, [{"message": f"invalid YAML: {e}"}]
            if not errors and not isinstance(meta, dict):
                errors.append({"message": "the metadata must be a YAML mapping"})
            elif isinstance(meta, dict) and "base_model" in meta:
                base = meta["base_model"]
                items = base if isinstance(base, list) else [base]
                if not all(isinstance(b, str) for b in items):
                    errors.append({"message": '"base_model" must be a string or a list of strings'})
        payload = {"errors": errors, "warnings": []}
        if errors:
            self._send(400, json.dumps(payload).encode())
        else:
            self._json(payload)

    def _create_branch(self, repo_id: str, branch: str) -> None:
        repo = self._writable_repo_or_error(repo_id)
        if repo is None:
            return
        body = self._json_body()
        start = body.get("startingPoint") if isinstance(body, dict) else None
        with self.hub._lock:
            if branch in repo.refs:
                self._error(409, None, f"Reference refs/heads/{branch} already exists")
                return
            sha = repo.resolve(start or "main")
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {start or 'main'}")
                return
            repo.refs[branch] = sha
        self._json({})

    def _preupload(self, repo_id: str, rev: str) -> None:
        repo = self._writable_repo_or_error(repo_id)
        if repo is None:
            return
        sha = self._commit_or_error(repo, rev)
        if sha is None:
            return
        body = self._json_body()
        files = body.get("files") if isinstance(body, dict) else None
        if not isinstance(files, list):
            self._error(400, None, "'files' is required")
            return
        with self.hub._lock:
            tree = dict(repo.commits[sha])
        answer = []
        for item in files:
            name, size = str(item.get("path")), int(item.get("size", 0))
            current = tree.get(name)
            answer.append(
                {
                    "path": name,
                    "uploadMode": "lfs" if _is_lfs(name, size) else "regular",
                    "shouldIgnore": False,
                    # what the client compares with its own oid to skip unchanged files
                    "oid": None if current is None else current.etag,
                }
            )
        self._json({"files": answer, "commitOid": sha})

    def _lfs_batch(self, repo_id: str) -> None:
        repo = self._writable_repo_or_error(repo_id)
        if repo is None:
            return
        body = self._json_body()
        if not isinstance(body, dict) or body.get("operation") != "upload":
            self._error(400, None, "only the upload operation is supported")
            return
        if "basic" not in (body.get("transfers") or ["basic"]):
            self._error(422, None, "only the basic transfer is supported")
            return
        objects = []
        for obj in body.get("objects") or []:
            oid, size = str(obj.get("oid")), obj.get("size")
            if not _HEX64.match(oid) or not isinstance(size, int) or size < 0:
                objects.append(
                    {"oid": oid, "size": -1, "error": {"code": 422, "message": "bad oid or size"}}
                )
                continue
            with self.hub._lock:
                present = (repo_id, oid) in self.hub._lfs_store
                ticket = secrets.token_urlsafe(16)
                if not present:
                    self.hub._lfs_tickets[ticket] = (repo_id, oid, size)
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not present:  # no "actions": the Hub has the object already
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/_lfs/{ticket}", "expires_in": 3600},
                    "verify": {
                        "href": f"{self.hub.url}/{repo_id}.git/info/lfs/objects/verify",
                        "header": {},
                    },
                }
            objects.append(entry)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_put(self, ticket: str) -> None:
        """The storage URL of the basic transfer (S3 on the Hub): no Authorization needed."""
        with self.hub._lock:
            target = self.hub._lfs_tickets.pop(ticket, None)
        if target is None:
            self._send(403, b"<Error>AccessDenied</Error>", content_type="application/xml")
            return
        repo_id, oid, size = target
        data = self._body
        if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
            self._send(400, b"<Error>BadDigest</Error>", content_type="application/xml")
            return
        with self.hub._lock:
            self.hub._lfs_store[(repo_id, oid)] = data
            self.hub._lfs_uploads.append((repo_id, oid))
        self._send(
            200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'}, content_type="text/plain"
        )

    def _lfs_verify(self, repo_id: str) -> None:
        if self._writable_repo_or_error(repo_id) is None:
            return
        body = self._json_body()
        oid = str(body.get("oid")) if isinstance(body, dict) else ""
        with self.hub._lock:
            data = self.hub._lfs_store.get((repo_id, oid))
        if data is None or len(data) != (body or {}).get("size"):
            self._error(404, None, f"object {oid} was not uploaded")
            return
        self._json({"success": True})

    def _commit(self, repo_id: str, rev: str) -> None:
        repo = self._writable_repo_or_error(repo_id)
        if repo is None:
            return
        if self._query.get("create_pr"):
            self._error(400, None, "pull requests are not supported by this test Hub")
            return
        with self.hub._lock:
            if rev not in repo.refs:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev} (not a branch)")
                return
            parent = repo.refs[rev]
            tree = dict(repo.commits[parent])
        try:
            lines = [json.loads(line) for line in self._body.splitlines() if line.strip()]
        except ValueError:
            self._error(400, None, "the body must be NDJSON")
            return
        if not lines or lines[0].get("key") != "header":
            self._error(400, None, "the first line must be the commit header")
            return
        header = lines[0].get("value") or {}
        summary = str(header.get("summary") or "")
        expected_parent = header.get("parentCommit")
        if expected_parent and not parent.startswith(str(expected_parent)):
            self._error(412, None, "A commit has happened since. Please refresh and try again.")
            return
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            name = str(value.get("path", "")).strip("/")
            if key == "file":
                data = base64.b64decode(value.get("content", ""))
                if _is_lfs(name, len(data)):
                    self._error(400, None, f"{name} must be uploaded with Git LFS (binary file)")
                    return
                tree[name] = _File.from_bytes(name, data, lfs=False)
            elif key == "lfsFile":
                oid = str(value.get("oid"))
                with self.hub._lock:
                    stored = self.hub._lfs_store.get((repo_id, oid))
                if stored is None:
                    self._error(400, None, f"{name}: LFS object {oid} was never uploaded")
                    return
                tree[name] = _File.from_bytes(name, stored, lfs=True)
            elif key == "deletedFile":
                tree.pop(name, None)
            elif key == "deletedFolder":
                tree = {n: f for n, f in tree.items() if not n.startswith(name + "/")}
            else:
                self._error(400, None, f"unknown operation {key!r}")
                return
        digest = hashlib.sha1(f"{repo_id}\n{parent}\n{summary}".encode())
        for f in sorted(tree.values(), key=lambda f: f.name):
            digest.update(f"\n{f.name}\0{f.size}\0{f.sha256}".encode())
        digest.update(secrets.token_bytes(8))  # two commits of one tree still differ, as in git
        sha = digest.hexdigest()
        with self.hub._lock:
            repo.commits[sha] = tree
            repo.history[sha] = (summary, parent)
            repo.refs[rev] = sha
        self._json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}",
                "hookOutput": "",
            }
        )
