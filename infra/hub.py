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


def _translate(e: Exception, ref: ModelReference, access: HubAccess) -> HubPinError:
    from huggingface_hub.errors import (
        DisabledRepoError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = ref.location
    model = str(ref)
    has_token = bool(access.token)
    if isinstance(e, GatedRepoError):
        why = (
            "the tenant's Hub token has no access: accept the model's conditions on its Hub "
            "page with the token's account, or store another token (PUT /v1/tenant/hub-token)"
            if has_token
            else f"store a Hugging Face token with access ({_STORE_TOKEN})"
        )
        return HubPinError(f"{repo} is gated: {why}", model=model)
    if isinstance(e, RepositoryNotFoundError):
        why = (
            "check the repo id; if it is private, the tenant's Hub token has no access"
            if has_token
            else f"check the repo id; if it is private, store a token with access ({_STORE_TOKEN})"
        )
        return HubPinError(f"repository {repo} not found on the Hub ({why})", model=model)
    if isinstance(e, RevisionNotFoundError):
        rev = ref.revision or DEFAULT_REVISION
        return HubPinError(
            f"revision {rev!r} not found in {repo} (check the branch, tag or commit sha)",
            model=model,
        )
    if isinstance(e, DisabledRepoError):
        return HubPinError(f"{repo} has been disabled on the Hub", model=model)
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            return HubPinError(
                f"{repo} is gated or private and the Hub refused access (HTTP {status}); "
                f"store a token with access ({_STORE_TOKEN})",
                model=model,
            )
        retryable = status is None or status == 429 or status >= 500
        return HubPinError(
            f"the Hub answered HTTP {status} for {repo}"
            + ("; try again later" if retryable else ""),
            model=model,
            retryable=retryable,
        )
    # Anything else is the transport: endpoint down, DNS, timeout, offline mode.
    text = str(e)
    if access.token:
        text = text.replace(access.token, "***")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return HubPinError(
        f"the Hugging Face Hub could not be reached to pin {repo} ({type(e).__name__}: "
        f"{first}); try again later",
        model=model,
        retryable=True,
    )
