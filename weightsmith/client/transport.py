"""The connection to the service: the API key, retries with backoff, errors as values.

Every request goes through :meth:`Transport._request`: it is resent after a connection
error or a 502/503/504 (the server's ``Retry-After``, else exponential backoff with jitter),
and a 4xx/5xx answer becomes a :class:`~weightsmith.client.errors.ClientError`. The API key
is sent only to the API's own origin: ``_elsewhere`` (for presigned object-store URLs)
never carries it.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from weightsmith.client.errors import ClientError, ConfigurationError, ServiceUnreachable

URL_ENV = "WEIGHTSMITH_URL"
TOKEN_ENV = "WEIGHTSMITH_TOKEN"

RETRY_STATUSES = frozenset({502, 503, 504})
MAX_RETRY_AFTER_S = 30.0
CHUNK = 1 << 20  # bytes read or written at a time when streaming a file

_Model = TypeVar("_Model", bound=BaseModel)


@dataclass
class Attempts:
    """Backoff between attempts: the server's Retry-After, else exponential with jitter."""

    retries: int
    backoff_s: float
    n: int = field(default=0)

    def left(self) -> bool:
        return self.n < self.retries

    def pause(self, response: httpx.Response | None = None) -> None:
        delay = self.backoff_s * (2**self.n) * (1 + random.random() / 4)
        after = response.headers.get("retry-after") if response is not None else None
        if after is not None and after.strip().isdigit():
            delay = min(float(after), MAX_RETRY_AFTER_S)
        self.n += 1
        time.sleep(delay)


class Transport:
    """The weightsmith API at ``url`` with API key ``token``: the HTTP clients and the
    request loop that the job, artifact and upload calls share (see
    :class:`weightsmith.client.Client`)."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        url = url or os.environ.get(URL_ENV)
        token = token or os.environ.get(TOKEN_ENV)
        if not url:
            raise ConfigurationError(
                f"no service URL: pass --url or set {URL_ENV} (e.g. http://127.0.0.1:8000)"
            )
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"service URL {url!r} is not an http:// or https:// URL")
        if not token:
            raise ConfigurationError(
                f"no API key: pass --token or set {TOKEN_ENV} (a key 'wsk_…' from "
                "'weightsmith keys create --tenant NAME' or the server's bootstrap key)"
            )
        from weightsmith import __version__

        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
        agent = {"User-Agent": f"weightsmith-client/{__version__}"}
        self._api = httpx.Client(
            base_url=self.url,
            headers={**agent, "Authorization": f"Bearer {token}"},
            timeout=timeout,
            transport=transport,
            follow_redirects=False,
        )
        # For redirects away from the API (presigned URLs): no Authorization header, ever.
        self._elsewhere = httpx.Client(
            headers=agent, timeout=timeout, transport=transport, follow_redirects=False
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._api.close()
        self._elsewhere.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        in_flight: bool = False,
    ) -> httpx.Response:
        """One API call, resent after a connection error or 502/503/504 (and, with
        ``in_flight``, after a 409 for an Idempotency-Key still being processed)."""
        attempts = Attempts(self.retries, self.backoff_s)
        while True:
            try:
                response = self._api.request(
                    method, path, json=json_body, params=params, headers=headers
                )
            except httpx.TransportError as e:
                if attempts.left():
                    attempts.pause()
                    continue
                raise self._unreachable(method, path, e) from e
            retry = response.status_code in RETRY_STATUSES or (
                in_flight and response.status_code == 409
            )
            if retry and attempts.left():
                attempts.pause(response)
                continue
            if response.status_code >= 400:
                raise ClientError.from_response(response)
            return response

    def _unreachable(self, method: str, path: str, e: httpx.TransportError) -> ClientError:
        what = str(e) or type(e).__name__
        if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
            return ServiceUnreachable(
                f"cannot reach the weightsmith service at {self.url} ({what}); check "
                f"--url / {URL_ENV} and that the service is running",
                title="Service unreachable",
            )
        return ServiceUnreachable(
            f"{method} {self.url}{path} failed after {self.retries + 1} attempts: {what}",
            title="Service unreachable",
        )


def same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def path_segment(value: str) -> str:
    """One URL path segment (ids, names and versions never contain '/')."""
    return quote(value, safe="")


def decode_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as e:
        raise ClientError(
            f"{response.request.method} {response.request.url} answered "
            f"{response.status_code} with a body that is not JSON; is the URL a weightsmith "
            "service?",
            status=response.status_code,
        ) from e


def parse_answer(model: type[_Model], response: httpx.Response) -> _Model:
    try:
        return model.model_validate(decode_json(response))
    except ValidationError as e:
        raise ClientError(
            f"{response.request.method} {response.request.url}: unexpected answer "
            f"({e.error_count()} problems, first: {e.errors()[0]['msg']}); is the client "
            "older than the service?",
            status=response.status_code,
        ) from None
