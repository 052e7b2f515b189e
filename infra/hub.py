"""Pin a Hugging Face Hub reference to a commit at submission time (no download, no torch).

The API resolves ``org/name`` or ``org/name@branch`` to the commit sha the branch points to
now, so the job is reproducible whatever the branch does later; the worker then downloads
exactly that commit. A gated repository is also checked for access here (its metadata is
public, its files are not), so a job that could never download its inputs is refused at
once instead of failing on the worker.

The endpoint and token are passed to every huggingface_hub call explicitly: the library
reads ``HF_ENDPOINT`` once, at import. The token never appears in an error message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from schemas.references import COMMIT_SHA, ModelReference, ReferenceKind

DEFAULT_REVISION = "main"
TIMEOUT_S = 10.0
_STORE_TOKEN = "PUT /v1/tenant/hub-token, or 'weightsmith hub-token set'"


class HubPinError(Exception):
    """A hub reference that cannot be pinned. ``retryable``: the Hub was unreachable or
    answered 429/5xx, so trying again later may work; otherwise the reference is wrong."""

    def __init__(self, message: str, *, model: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.model = model
        self.retryable = retryable


@dataclass(frozen=True)
class HubAccess:
    """Where the Hub is and the token of the tenant the request is for (service.tenancy).

    ``token`` None means anonymous: no token at all, never one huggingface_hub would find in
    the environment (``HF_TOKEN``) or a saved login, which may be the operator's.
    """

    endpoint: str | None = None  # None: huggingface_hub's default
    token: str | None = field(default=None, repr=False)

    @property
    def client_token(self) -> str | bool:
        """What huggingface_hub's ``token=`` gets: the token, or False (send none)."""
        return self.token if self.token else False


def pin_hub_reference(ref: ModelReference, access: HubAccess) -> ModelReference:
    """``ref`` with its revision replaced by the commit sha it names now.

    A reference already pinned to a sha is checked too (repo and commit must exist).
    Raises :class:`HubPinError`.
    """
    if ref.kind is not ReferenceKind.HUB:
        raise ValueError(f"{ref} is not a Hugging Face Hub reference")
    from huggingface_hub import HfApi

    api = HfApi(endpoint=access.endpoint, token=access.client_token)
    try:
        info = api.model_info(
            ref.location, revision=ref.revision or DEFAULT_REVISION, timeout=TIMEOUT_S
        )
    except Exception as e:
        raise _translate(e, ref, access) from e
    sha = str(info.sha or "")
    if not COMMIT_SHA.match(sha):
        raise HubPinError(
            f"the Hub returned no commit sha for {ref.location}", model=str(ref), retryable=True
        )
    if info.gated:
        _check_file_access(api, ref, sha, info, access)
    return ref.with_revision(sha)


def _check_file_access(
    api: Any, ref: ModelReference, sha: str, info: Any, access: HubAccess
) -> None:
    """A HEAD on one file of a gated repo: 401/403 means the worker could not download it."""
    from huggingface_hub import hf_hub_url

    names = [s.rfilename for s in info.siblings or []]
    if not names:
        return
    probe = "config.json" if "config.json" in names else names[0]
    url = hf_hub_url(ref.location, probe, revision=sha, endpoint=api.endpoint)
    try:
        api.get_hf_file_metadata(url=url, timeout=TIMEOUT_S)
    except Exception as e:
        raise _translate(e, ref, access) from e


# ---- one classification of the Hub's failures (pins, downloads, pushes word them) ------------


class HubFailureKind(StrEnum):
    GATED = "gated"  # a gated repo the token may not read
    REPO_NOT_FOUND = "repo_not_found"  # unknown, or private and not visible to the token
    REVISION_NOT_FOUND = "revision_not_found"
    ENTRY_NOT_FOUND = "entry_not_found"  # a file missing at that commit
    DISABLED = "disabled"
    UNAUTHORIZED = "unauthorized"  # HTTP 401: no or a bad token
    FORBIDDEN = "forbidden"  # HTTP 403
    NOT_FOUND = "not_found"  # another HTTP 404
    BUSY = "busy"  # 408, 409, 412, 423, 429, 5xx, or no status: try again later
    REFUSED = "refused"  # another HTTP status
    OFFLINE = "offline"  # huggingface_hub's offline mode
    UNREACHABLE = "unreachable"  # the transport failed: endpoint down, DNS, timeout
    OTHER = "other"


_BUSY_STATUS = frozenset({408, 409, 412, 423, 429})


@dataclass(frozen=True)
class HubFailure:
    """What a huggingface_hub call's exception means, whoever made the call."""

    kind: HubFailureKind
    error: BaseException  # the exception of the chain that says it
    status: int | None = None
    server_message: str = ""  # the Hub's own first line (X-Error-Message), if any

    @property
    def transient(self) -> bool:
        return self.kind in (HubFailureKind.BUSY, HubFailureKind.UNREACHABLE)


def is_network_error(e: BaseException) -> bool:
    """A transport failure of any HTTP client huggingface_hub may use."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        kinds = tuple(t for n in names if isinstance(t := getattr(mod, n, None), type))
        if kinds and isinstance(e, kinds):
            return True
    return False


def classify_hub_error(e: BaseException) -> HubFailure:
    """The kind of a failed huggingface_hub call. huggingface_hub wraps errors (an LFS
    upload's in ``RuntimeError``, a transport's in its own): the whole ``__cause__`` chain
    is read, an HTTP answer first, then a transport failure."""
    from huggingface_hub.errors import (
        DisabledRepoError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain = [e]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    found: BaseException = next(
        (c for c in chain if isinstance(c, HfHubHTTPError)),
        next((c for c in chain if is_network_error(c)), e),
    )
    if isinstance(found, OfflineModeIsEnabled):
        return HubFailure(HubFailureKind.OFFLINE, found)
    if isinstance(found, LocalEntryNotFoundError) or is_network_error(found):
        return HubFailure(HubFailureKind.UNREACHABLE, found)
    if not isinstance(found, HfHubHTTPError):
        return HubFailure(HubFailureKind.OTHER, found)
    status = found.response.status_code if found.response is not None else None
    server = _server_message(found)
    kind = (
        HubFailureKind.GATED
        if isinstance(found, GatedRepoError)
        else HubFailureKind.REPO_NOT_FOUND
        if isinstance(found, RepositoryNotFoundError)
        else HubFailureKind.REVISION_NOT_FOUND
        if isinstance(found, RevisionNotFoundError)
        else HubFailureKind.ENTRY_NOT_FOUND
        if isinstance(found, RemoteEntryNotFoundError)
        else HubFailureKind.DISABLED
        if isinstance(found, DisabledRepoError)
        else HubFailureKind.UNAUTHORIZED
        if status == 401
        else HubFailureKind.FORBIDDEN
        if status == 403
        else HubFailureKind.NOT_FOUND
        if status == 404
        else HubFailureKind.BUSY
        if status is None or status in _BUSY_STATUS or status >= 500
        else HubFailureKind.REFUSED
    )
    return HubFailure(kind, found, status, server)


def _server_message(e: Any) -> str:
    text = getattr(e, "server_message", None) or ""
    if not text and getattr(e, "response", None) is not None:
        text = e.response.headers.get("X-Error-Message", "")
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def first_line(e: BaseException, *secrets: str | None) -> str:
    """The first line of an exception's text with ``secrets`` replaced by ``***``."""
    text = str(e)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    lines = text.strip().splitlines()
    return lines[0].rstrip(".") if lines else type(e).__name__


def _translate(e: Exception, ref: ModelReference, access: HubAccess) -> HubPinError:
    repo = ref.location
    model = str(ref)
    has_token = bool(access.token)
    failure = classify_hub_error(e)
    kind = failure.kind
    if kind is HubFailureKind.GATED:
        why = (
            "the tenant's Hub token has no access: accept the model's conditions on its Hub "
            "page with the token's account, or store another token (PUT /v1/tenant/hub-token)"
            if has_token
            else f"store a Hugging Face token with access ({_STORE_TOKEN})"
        )
        return HubPinError(f"{repo} is gated: {why}", model=model)
    if kind is HubFailureKind.REPO_NOT_FOUND:
        why = (
            "check the repo id; if it is private, the tenant's Hub token has no access"
            if has_token
            else f"check the repo id; if it is private, store a token with access ({_STORE_TOKEN})"
        )
        return HubPinError(f"repository {repo} not found on the Hub ({why})", model=model)
    if kind is HubFailureKind.REVISION_NOT_FOUND:
        rev = ref.revision or DEFAULT_REVISION
        return HubPinError(
            f"revision {rev!r} not found in {repo} (check the branch, tag or commit sha)",
            model=model,
        )
    if kind is HubFailureKind.DISABLED:
        return HubPinError(f"{repo} has been disabled on the Hub", model=model)
    if kind in (HubFailureKind.UNAUTHORIZED, HubFailureKind.FORBIDDEN):
        return HubPinError(
            f"{repo} is gated or private and the Hub refused access (HTTP {failure.status}); "
            f"store a token with access ({_STORE_TOKEN})",
            model=model,
        )
    if failure.status is not None or kind is HubFailureKind.BUSY:
        return HubPinError(
            f"the Hub answered HTTP {failure.status} for {repo}"
            + ("; try again later" if failure.transient else ""),
            model=model,
            retryable=failure.transient,
        )
    # Anything else is the transport: endpoint down, DNS, timeout, offline mode.
    return HubPinError(
        f"the Hugging Face Hub could not be reached to pin {repo} ({type(e).__name__}: "
        f"{first_line(e, access.token)}); try again later",
        model=model,
        retryable=True,
    )
