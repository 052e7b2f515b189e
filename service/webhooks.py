"""Webhook delivery (Standard Webhooks): signing, the URL safety check, the dispatcher.

**Signing** (https://www.standardwebhooks.com): every request carries ``webhook-id`` (the
message id, the same on every retry), ``webhook-timestamp`` (unix seconds of this attempt)
and ``webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>``, where
the key is the base64-decoded part of the ``whsec_…`` secret.

**Addresses** (SSRF). A webhook URL must be http(s) and every address its host resolves to
must be public: loopback, private, link-local (cloud metadata), multicast, reserved,
unspecified and shared addresses are refused, also when wrapped in IPv6 (IPv4-mapped,
6to4, NAT64). The API checks at submission (422 naming the field); the dispatcher checks
again before each attempt and connects to the address it checked, so a name that later
resolves elsewhere (DNS rebinding) cannot redirect a delivery. Redirects are not followed.
``WEIGHTSMITH_WEBHOOK_ALLOW_PRIVATE`` turns the check off (tests, closed networks).

**Dispatching.** :class:`WebhookDispatcher` takes due outbox rows (infra.db.webhooks), sends
them, and records each attempt: a 2xx answer delivers the message, anything else (another
status, a timeout, a refused address) schedules a retry after the next delay of
``WEIGHTSMITH_WEBHOOK_RETRY_DELAYS`` (with jitter) or, when they are used up, fails it.
:class:`DispatcherLoop` runs one in a thread: in ``weightsmith serve`` (embedded) and in
each Celery worker's main process; the Celery task ``weightsmith.deliver_webhooks`` runs one
round on demand. Any number may run at once: claiming is exclusive.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import httpx

import weightsmith
from infra.db.webhooks import AttemptOutcome, ClaimedMessage, WebhookStore
from infra.secrets import SecretBox
from schemas.jobs import ProblemItem
from schemas.webhooks import SECRET_PREFIX
from service.errors import Problem

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from infra.settings import Settings

log = logging.getLogger("weightsmith.webhooks")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_RESPONSE_EXCERPT = 200

# The Celery task that runs one dispatcher round (sent by name; defined in workers.tasks).
DELIVER_WEBHOOKS_TASK = "weightsmith.deliver_webhooks"


# ---- signing -----------------------------------------------------------------------------


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: ``v1,<base64 HMAC-SHA256>``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
        "content-type": "application/json",
        "user-agent": f"weightsmith-webhooks/{weightsmith.__version__}",
    }


# ---- the URL check -----------------------------------------------------------------------


class WebhookUrlRefused(ValueError):
    """A webhook URL that may not be called; the message says why (for the client)."""


@dataclass(frozen=True)
class WebhookTarget:
    """A checked URL and the addresses it may be reached at (empty: any, unchecked)."""

    url: httpx.URL
    addresses: tuple[IPAddress, ...] = ()


def non_public_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public address a webhook may go to; None if it is one."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = non_public_reason(embedded)
            if inner is not None:
                return f"{inner} (as {ip})"
    for test, reason in (
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_private, "a private address"),
        (ip.is_reserved, "a reserved address"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED, "a shared (CGNAT) address"),
        (not ip.is_global, "not a public address"),
    ):
        if test:
            return reason
    return None


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def check_webhook_url(
    url: str, *, allow_private: bool, resolve: Resolver = _resolve
) -> WebhookTarget:
    """Check a webhook URL (scheme, host, every resolved address); raises WebhookUrlRefused.

    With ``allow_private`` only the scheme and host are checked (nothing is resolved).
    """
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise WebhookUrlRefused(f"{url!r} is not a valid URL: {e}") from None
    if parsed.scheme not in ("http", "https"):
        raise WebhookUrlRefused(f"a webhook URL is http or https, not {parsed.scheme!r}")
    host = parsed.host
    if not host:
        raise WebhookUrlRefused(f"{url!r} has no host")
    if allow_private:
        return WebhookTarget(parsed)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        raw = [str(literal)]
    else:
        try:
            raw = list(resolve(host, port))
        except (OSError, UnicodeError) as e:
            raise WebhookUrlRefused(f"host {host!r} could not be resolved ({e})") from None
        if not raw:
            raise WebhookUrlRefused(f"host {host!r} resolves to no address")
    addresses: list[IPAddress] = []
    for text in raw:
        ip = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone index
        reason = non_public_reason(ip)
        if reason is not None:
            shown = host if literal is not None else f"{host!r}, which resolves to {ip},"
            raise WebhookUrlRefused(
                f"{shown} is {reason}: webhooks go to public addresses only (the operator "
                "can allow private ones with WEIGHTSMITH_WEBHOOK_ALLOW_PRIVATE)"
            )
        if ip not in addresses:
            addresses.append(ip)
    return WebhookTarget(parsed, tuple(addresses))


# ---- the dispatcher ----------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Delays before each retry; ``len(delays_s) + 1`` attempts in all."""

    delays_s: tuple[float, ...] = (5, 30, 120, 600, 3600, 14400)
    jitter: float = 0.2
    rng: random.Random = field(default_factory=random.Random, compare=False)

    @property
    def max_attempts(self) -> int:
        return len(self.delays_s) + 1

    def retry_in(self, attempt: int) -> timedelta | None:
        """Wait after failed attempt ``attempt`` (1-based); None when none is left."""
        if attempt > len(self.delays_s):
            return None
        base = self.delays_s[attempt - 1]
        spread = base * self.jitter
        return timedelta(seconds=max(0.0, base + self.rng.uniform(-spread, spread)))


def _utcnow() -> datetime:
    return datetime.now(UTC)


class WebhookDispatcher:
    """Delivers due outbox messages. :meth:`deliver_due` until it returns 0 empties the
    backlog; up to ``concurrency`` messages are in flight at a time."""

    def __init__(
        self,
        store: WebhookStore,
        *,
        timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        allow_private: bool = False,
        concurrency: int = 4,
        resolve: Resolver = _resolve,
        clock: Callable[[], datetime] = _utcnow,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self.retry = retry if retry is not None else RetryPolicy()
        self.allow_private = allow_private
        self.concurrency = max(1, concurrency)
        # Long enough that an attempt in progress is never taken over by another dispatcher.
        self.lease = timedelta(seconds=2 * timeout_s + 30)
        self._resolve = resolve
        self._clock = clock
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
            trust_env=False,  # a proxy would connect elsewhere than the address checked
            transport=transport,
        )
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="webhook-send")

    @classmethod
    def from_settings(cls, settings: Settings, engine: Engine) -> WebhookDispatcher:
        return cls(
            WebhookStore(engine, SecretBox.from_settings(settings)),
            timeout_s=settings.webhook_timeout,
            retry=RetryPolicy(settings.webhook_retry_delays_s, settings.webhook_retry_jitter),
            allow_private=settings.webhook_allow_private,
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    def deliver_due(self) -> int:
        """One round: claim due messages, attempt each once, record. Returns how many."""
        claimed = self.store.claim_due(self.concurrency, self.lease)
        if claimed:
            list(self._pool.map(self._deliver, claimed))
        return len(claimed)

    def deliver_all_due(self, max_rounds: int = 1000) -> int:
        """Rounds until nothing is due (or ``max_rounds``); returns the attempts made."""
        total = 0
        for _ in range(max_rounds):
            n = self.deliver_due()
            if n == 0:
                break
            total += n
        return total

    def _deliver(self, message: ClaimedMessage) -> None:
        try:
            outcome = self._attempt(message)
            retry_in = None if outcome.ok else self.retry.retry_in(message.attempt)
            if not self.store.record_attempt(message, outcome, retry_in):
                log.warning("webhook %s: claim lost before its attempt was recorded", message.id)
            elif not outcome.ok:
                log.info(
                    "webhook %s attempt %d to %s failed (%s); %s",
                    message.id,
                    message.attempt,
                    message.url,
                    outcome.error,
                    f"retry in {retry_in.total_seconds():.0f} s" if retry_in else "giving up",
                )
        except Exception:  # one bad message must not stop the others
            log.exception("webhook %s: delivery failed unexpectedly", message.id)

    def _attempt(self, message: ClaimedMessage) -> AttemptOutcome:
        started = self._clock()
        t0 = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            secret = self.store.secret_for(message)
            if secret is None:
                raise WebhookUrlRefused("the subscription was deleted")
            target = check_webhook_url(
                message.url, allow_private=self.allow_private, resolve=self._resolve
            )
            body = message.body.encode()
            headers = signed_headers(secret, message.id, int(time.time()), body)
            status, excerpt = self._post(target, body, headers)
            if not 200 <= status < 300:
                error = f"HTTP {status}" + (f": {excerpt}" if excerpt else "")
        except WebhookUrlRefused as e:
            error = f"refused: {e}"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        duration_ms = int((time.monotonic() - t0) * 1000)
        return AttemptOutcome(started, duration_ms, status, error)

    def _post(self, target: WebhookTarget, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
        """POST to the checked address (Host header and TLS name stay the URL's)."""
        url = target.url
        if not target.addresses:
            return self._send(url, body, headers, {})
        last: httpx.HTTPError | None = None
        for ip in target.addresses:
            extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
            pinned = {**headers, "host": url.netloc.decode("ascii")}
            try:
                return self._send(url.copy_with(host=str(ip)), body, pinned, extensions)
            except httpx.ConnectError as e:  # try the host's next address
                last = e
        assert last is not None
        raise last

    def _send(
        self, url: httpx.URL, body: bytes, headers: dict[str, str], extensions: dict[str, str]
    ) -> tuple[int, str]:
        request = self._client.build_request(
            "POST", url, content=body, headers=headers, extensions=extensions
        )
        response = self._client.send(request, stream=True)
        try:
            excerpt = b""
            for chunk in response.iter_raw():  # at most a short excerpt of the answer
                excerpt += chunk
                if len(excerpt) >= _RESPONSE_EXCERPT:
                    break
            text = excerpt[:_RESPONSE_EXCERPT].decode("utf-8", "replace").strip()
            return response.status_code, text
        finally:
            response.close()


class DispatcherLoop:
    """Runs a dispatcher in a daemon thread: a round every ``interval_s`` seconds, or at
    once after :meth:`wake` (e.g. after a job changed state)."""

    def __init__(self, dispatcher: WebhookDispatcher, interval_s: float) -> None:
        self.dispatcher = dispatcher
        self.interval_s = interval_s
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook-dispatcher", daemon=True)

    @classmethod
    def from_settings(cls, settings: Settings, engine: Engine) -> DispatcherLoop:
        return cls(
            WebhookDispatcher.from_settings(settings, engine), settings.webhook_poll_interval
        )

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.dispatcher.close()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.dispatcher.deliver_all_due(max_rounds=100)
            except Exception:
                log.exception("webhook dispatch round failed; trying again later")
            self._wake.wait(self.interval_s)
            self._wake.clear()


def refuse_unsafe_url(settings: Settings, url: str, pointer: str) -> None:
    """422 naming ``pointer`` unless ``url`` may receive webhooks (:func:`check_webhook_url`)."""
    try:
        check_webhook_url(url, allow_private=settings.webhook_allow_private)
    except WebhookUrlRefused as e:
        raise Problem(
            422,
            f"{pointer}: {e}",
            title="Webhook URL refused",
            errors=[ProblemItem(detail=str(e), pointer=pointer)],
        ) from e
