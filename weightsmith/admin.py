"""The operator's commands: tenants (grants, disable), secret keys; and a tenant's own Hub
token (``weightsmith hub-token``, through the API).

``weightsmith tenants …`` and ``weightsmith secrets …`` act on the configured database
directly (``WEIGHTSMITH_DATABASE_URL``, ``WEIGHTSMITH_SECRET_KEYS``): they are for whoever
runs the service, not for tenants. Secrets are never taken as command-line arguments (they
would land in the shell history and the process list): an S3 secret key comes from an
environment variable or a prompt, a Hub token from a prompt or standard input.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from weightsmith.cli_common import EXIT_INPUT, fail, settings_or_fail

GRANT_SECRET_ENV = "WEIGHTSMITH_GRANT_SECRET_ACCESS_KEY"


@contextlib.contextmanager
def _tenant_store(settings: Any) -> Iterator[Any]:
    """The TenantStore of the configured database, migrated first."""
    from infra.db import make_engine, upgrade_database
    from infra.db.tenants import TenantStore
    from infra.secrets import SecretBox

    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        yield TenantStore(engine, SecretBox.from_settings(settings))
    finally:
        engine.dispose()


def _operator(run: Callable[[Any, Any, argparse.Namespace], int]) -> Callable[..., int]:
    """A tenants subcommand: the stores, and every expected refusal as one line (exit 2)."""

    def command(args: argparse.Namespace) -> int:
        from infra.db.tenants import UnknownTenant
        from infra.secrets import SecretKeyError
        from schemas.tenants import GrantError

        settings = settings_or_fail()
        try:
            with _tenant_store(settings) as tenants:
                return run(tenants, settings, args)
        except (UnknownTenant, GrantError, SecretKeyError, ValueError) as e:
            return fail(str(e).strip('"'), EXIT_INPUT)

    command.__doc__ = run.__doc__
    return command


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


@_operator
def _list(tenants: Any, settings: Any, args: argparse.Namespace) -> int:
    """List tenants."""
    rows = tenants.list()
    if not rows:
        print("no tenants")
        return 0
    print(f"{'NAME':30} {'STATE':9} {'HUB TOKEN':10} CREATED")
    for t in rows:
        state = "disabled" if t.disabled_at else "active"
        token = "own" if t.hub_token_set_at else ("service" if t.use_operator_hub_token else "-")
        print(f"{t.name:30} {state:9} {token:10} {_when(t.created_at)}")
    return 0


@_operator
def _show(tenants: Any, settings: Any, args: argparse.Namespace) -> int:
    """Show one tenant's grants and Hub token status (never a secret)."""
    match = [t for t in tenants.list() if t.name == args.name]
    if not match:
        from infra.db.tenants import UnknownTenant

        raise UnknownTenant(args.name)
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    access = tenants.access(match[0].id, operator_hub_token=token)
    print(f"tenant:     {access.name} ({'disabled' if access.disabled else 'active'})")
    print(f"hub token:  {access.hub_token_source or 'none (public repositories only)'}")
    print(f"hub push:   {', '.join(sorted(access.push_namespaces)) or '-'}")
    for grant in access.s3_grants:
        at = f" at {grant.endpoint}" if grant.endpoint else ""
        print(f"s3 grant:   {grant.location}{at} ({grant.credentials} credentials)")
    if not access.s3_grants:
        print("s3 grant:   -")
    return 0


@_operator
def _disable(tenants: Any, settings: Any, args: argparse.Namespace) -> int:
    """Disable a tenant: its keys stop working, its schedules stop firing, its webhook
    deliveries are held (API replicas that cached a key forget it within
    WEIGHTSMITH_AUTH_CACHE_SECONDS)."""
    changed = tenants.set_disabled(args.name, True)
    print(f"tenant {args.name!r} {'disabled' if changed else 'was already disabled'}")
    return 0


@_operator
def _enable(tenants: Any, settings: Any, args: argparse.Namespace) -> int:
    """Enable a disabled tenant again."""
    changed = tenants.set_disabled(args.name, False)
    print(f"tenant {args.name!r} {'enabled' if changed else 'was not disabled'}")
    return 0


def _s3_secret(args: argparse.Namespace) -> str | None:
    if args.access_key_id is None:
        return None
    secret = os.environ.get(GRANT_SECRET_ENV)
    if secret:
        return secret
    if sys.stdin.isatty():
        return getpass.getpass(f"secret access key for {args.access_key_id}: ")
    raise ValueError(
        f"--access-key-id needs its secret key in {GRANT_SECRET_ENV} (or typed at a prompt)"
    )


@_operator
def _grant_s3(tenants: Any, settings: Any, args: argparse.Namespace) -> int:
    """Let a tenant read an s3:// location, with credentials of that grant's own."""
    from service.tenancy import artifact_bucket

    modes = [args.access_key_id is not None, args.anonymous, args.store_credentials]
    if sum(modes) != 1:
        raise ValueError(
            "say how to read the location: --access-key-id ID (secret key in "
            f"{GRANT_SECRET_ENV} or a prompt), --anonymous (a public bucket) or "
            "--store-credentials (the artifact store's credentials, another bucket)"
        )
    mode = "keys" if modes[0] else "anonymous" if args.anonymous else "store"
    store = artifact_bucket(settings)
    endpoint = args.endpoint
    if endpoint is None and store is not None:
        endpoint = store.endpoint  # by default, the same S3 server as the artifacts
    grant = tenants.grant_s3(
        args.tenant,
        args.location,
        credentials=mode,
        endpoint=endpoint,
        region=args.region,
        access_key_id=args.access_key_id,
        secret_access_key=_s3_secret(args),
        artifact_bucket=store.bucket if store is not None else None,
    )
    at = f" at {grant.endpoint}" if grant.endpoint else ""
    print(f"tenant {args.tenant!r} may read {grant.location}{at} ({mode} credentials)")
    return 0


@_operator
def _revoke_s3(tenants: Any, settings: Any, args: argparse.Namespace) -> int:
    """Withdraw a tenant's grant of an s3:// location."""
    gone = tenants.revoke_s3(args.tenant, args.location)
    if not gone:
        raise ValueError(f"tenant {args.tenant!r} has no grant of exactly {args.location}")
    print(f"revoked {gone} grant(s) of {args.location} from tenant {args.tenant!r}")
    return 0


@_operator
def _grant_hub_push(tenants: Any, settings: Any, args: argparse.Namespace) -> int:
    """Let a tenant's jobs push artifacts to a Hub namespace (publish.hub_repo)."""
    new = tenants.grant_hub_push(args.tenant, args.namespace)
    print(
        f"tenant {args.tenant!r} may push to {args.namespace}/…"
        + ("" if new else " (already could)")
    )
    return 0


@_operator
def _revoke_hub_push(tenants: Any, settings: Any, args: argparse.Namespace) -> int:
    """Withdraw a tenant's Hub push grant."""
    if not tenants.revoke_hub_push(args.tenant, args.namespace):
        raise ValueError(f"tenant {args.tenant!r} may not push to {args.namespace!r} anyway")
    print(f"tenant {args.tenant!r} may no longer push to {args.namespace}/…")
    return 0


@_operator
def _service_hub_token(tenants: Any, settings: Any, args: argparse.Namespace) -> int:
    """Let a tenant without a token of its own use the service's (WEIGHTSMITH_HF_TOKEN)."""
    tenants.set_operator_hub_token(args.tenant, not args.revoke)
    verb = "no longer uses" if args.revoke else "uses"
    print(f"tenant {args.tenant!r} {verb} the service's Hub token when it has none of its own")
    return 0


def cmd_secrets_new_key(args: argparse.Namespace) -> int:
    from infra.secrets import new_key

    print(new_key())
    return 0


def cmd_secrets_rotate(args: argparse.Namespace) -> int:
    """Re-seal every stored secret with the first key of WEIGHTSMITH_SECRET_KEYS."""
    from infra.db import make_engine, upgrade_database
    from infra.db.tenants import TenantStore
    from infra.db.webhooks import WebhookStore
    from infra.secrets import SecretBox, SecretKeyError

    settings = settings_or_fail()
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        box = SecretBox.from_settings(settings)
        count = TenantStore(engine, box).reseal_secrets()
        count += WebhookStore(engine, box).seal_legacy_secrets(reseal=True)
    except SecretKeyError as e:
        return fail(str(e), EXIT_INPUT)
    finally:
        engine.dispose()
    print(f"re-sealed {count} secret(s) with the first key; older keys may now be dropped")
    return 0


# ---- a tenant's own Hub token, through the API ---------------------------------------------


def _read_token(args: argparse.Namespace) -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().strip()
    return getpass.getpass("Hugging Face token: ").strip()


def _hub_token_set(client: Any, args: argparse.Namespace) -> int:
    """Store your Hugging Face token with the service (read from a prompt or stdin)."""
    token = _read_token(args)
    if not token:
        return fail("no token given (type it at the prompt, or pipe it on stdin)", EXIT_INPUT)
    client.set_hub_token(token)
    print("stored your Hugging Face token (encrypted); your jobs' Hub pulls and pushes use it")
    return 0


def _hub_token_clear(client: Any, args: argparse.Namespace) -> int:
    """Forget your Hugging Face token."""
    client.clear_hub_token()
    print("your Hugging Face token is forgotten")
    return 0


def _tenant(client: Any, args: argparse.Namespace) -> int:
    """Show what your tenant may name: s3:// grants, Hub push namespaces, token status."""
    view = client.get_tenant()
    token = view.hub_token
    used = {"tenant": "yours", "operator": "the service's", None: "none"}[token.used]
    print(f"tenant:     {view.name}")
    print(f"hub token:  {used}" + (f" (set {_when(token.set_at)})" if token.configured else ""))
    print(f"hub push:   {', '.join(view.hub_push_namespaces) or '-'}")
    for grant in view.s3_grants:
        print(f"s3 grant:   {grant.location}" + (f" at {grant.endpoint}" if grant.endpoint else ""))
    if not view.s3_grants:
        print("s3 grant:   -")
    print(f"local paths: {'allowed' if view.local_paths else 'refused'}")
    return 0


def add_commands(
    sub: Any,
    remote: Callable[[str, str], argparse.ArgumentParser],
    as_command: Callable[[Callable[[Any, argparse.Namespace], int]], Callable[..., int]],
) -> None:
    """Register ``tenants``, ``secrets``, ``hub-token`` and ``tenant`` on the CLI's parser.
    ``remote`` makes a subcommand that talks to the service, ``as_command`` wraps its body."""
    t = sub.add_parser("tenants", help="operator: tenants, their grants, disable/enable")
    tsub = t.add_subparsers(dest="tenants_command", required=True)
    tl = tsub.add_parser("list", help="list tenants")
    tl.set_defaults(func=_list)
    ts = tsub.add_parser("show", help="a tenant's grants and Hub token status")
    ts.add_argument("name")
    ts.set_defaults(func=_show)
    for name, func, text in (
        ("disable", _disable, "stop a tenant's keys, schedules and webhooks"),
        ("enable", _enable, "enable a disabled tenant"),
    ):
        p = tsub.add_parser(name, help=text)
        p.add_argument("name")
        p.set_defaults(func=func)
    g = tsub.add_parser("grant-s3", help="let a tenant read an s3:// location")
    g.add_argument("--tenant", required=True)
    g.add_argument("location", help="s3://BUCKET/PREFIX/ (the prefix and everything under it)")
    g.add_argument("--endpoint", help="S3 server URL (default: the artifact store's, else AWS)")
    g.add_argument("--region", help="the bucket's region")
    g.add_argument("--access-key-id", help=f"read with this key (secret in {GRANT_SECRET_ENV})")
    g.add_argument("--anonymous", action="store_true", help="unsigned reads (a public bucket)")
    g.add_argument(
        "--store-credentials",
        action="store_true",
        help="read with the artifact store's credentials (another bucket on its server)",
    )
    g.set_defaults(func=_grant_s3)
    r = tsub.add_parser("revoke-s3", help="withdraw an s3:// grant")
    r.add_argument("--tenant", required=True)
    r.add_argument("location")
    r.set_defaults(func=_revoke_s3)
    for name, func, text in (
        ("grant-hub-push", _grant_hub_push, "let a tenant push to a Hub user/organisation"),
        ("revoke-hub-push", _revoke_hub_push, "withdraw a Hub push grant"),
    ):
        p = tsub.add_parser(name, help=text)
        p.add_argument("--tenant", required=True)
        p.add_argument("namespace", help="a Hub user or organisation name")
        p.set_defaults(func=func)
    h = tsub.add_parser(
        "grant-hub-token", help="let a tenant use the service's Hub token (WEIGHTSMITH_HF_TOKEN)"
    )
    h.add_argument("--tenant", required=True)
    h.add_argument("--revoke", action="store_true", help="withdraw it instead")
    h.set_defaults(func=_service_hub_token)

    s = sub.add_parser("secrets", help="operator: keys that encrypt stored secrets")
    ssub = s.add_subparsers(dest="secrets_command", required=True)
    sn = ssub.add_parser("new-key", help="print a new key for WEIGHTSMITH_SECRET_KEYS")
    sn.set_defaults(func=cmd_secrets_new_key)
    sr = ssub.add_parser("rotate", help="re-seal every stored secret with the first key")
    sr.set_defaults(func=cmd_secrets_rotate)

    ht = remote("hub-token", "store or forget your Hugging Face token with the service")
    htsub = ht.add_subparsers(dest="hub_token_command", required=True)
    hs = htsub.add_parser("set", help="store it (typed at a prompt, or piped on stdin)")
    hs.set_defaults(func=as_command(_hub_token_set))
    hc = htsub.add_parser("clear", help="forget it")
    hc.set_defaults(func=as_command(_hub_token_clear))
    tv = remote("tenant", "show what your tenant may name (grants, Hub token)")
    tv.set_defaults(func=as_command(_tenant))
