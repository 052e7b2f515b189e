"""The operator's commands: ``tenants`` (grants, disable/enable) and ``secrets`` (the keys
that encrypt stored secrets).

They act on the configured database directly (``WEIGHTSMITH_DATABASE_URL``,
``WEIGHTSMITH_SECRET_KEYS``): they are for whoever runs the service, not for tenants (a
tenant's own view is ``weightsmith tenant``, :mod:`weightsmith.cli.account`). Secrets are
never taken as command-line arguments (they would land in the shell history and the process
list): an S3 secret key comes from an environment variable or a prompt.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from weightsmith.cli.common import (
    EXIT_INPUT,
    add_json_option,
    fail,
    print_json,
    settings_or_fail,
    when,
)

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


@_operator
def _list(tenants: Any, settings: Any, args: argparse.Namespace) -> int:
    """List tenants."""
    found = tenants.list()

    def hub_token(t: Any) -> str | None:
        return "own" if t.hub_token_set_at else ("service" if t.use_operator_hub_token else None)

    if args.json:
        print_json(
            [
                {
                    "name": t.name,
                    "state": "disabled" if t.disabled_at else "active",
                    "hub_token": hub_token(t),
                    "created_at": t.created_at,
                }
                for t in found
            ]
        )
        return 0
    if not found:
        print("no tenants")
        return 0
    print(f"{'NAME':30} {'STATE':9} {'HUB TOKEN':10} CREATED")
    for t in found:
        state = "disabled" if t.disabled_at else "active"
        print(f"{t.name:30} {state:9} {hub_token(t) or '-':10} {when(t.created_at)}")
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
    if args.json:  # never the token itself: only where it comes from
        print_json(
            {
                "name": access.name,
                "state": "disabled" if access.disabled else "active",
                "hub_token": access.hub_token_source,
                "hub_push_namespaces": sorted(access.push_namespaces),
                "s3_grants": [
                    {"location": g.location, "endpoint": g.endpoint, "credentials": g.credentials}
                    for g in access.s3_grants
                ],
            }
        )
        return 0
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
    """Print a new random key for WEIGHTSMITH_SECRET_KEYS (put it first to rotate)."""
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


def add_commands(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    """Register ``tenants`` and ``secrets``."""

    def command(group: Any, name: str, help: str, func: Any) -> argparse.ArgumentParser:
        p = group.add_parser(name, help=help, description=func.__doc__, formatter_class=formatter)
        p.set_defaults(func=func)
        return p

    t = sub.add_parser(
        "tenants", help="operator: tenants, their grants, disable/enable", formatter_class=formatter
    )
    tsub = t.add_subparsers(dest="tenants_command", required=True)
    tl = command(tsub, "list", "list tenants", _list)
    add_json_option(tl, "the tenants")
    ts = command(tsub, "show", "a tenant's grants and Hub token status", _show)
    ts.add_argument("name", help="the tenant's name")
    add_json_option(ts, "the tenant's grants")
    for name, func, text in (
        ("disable", _disable, "stop a tenant's keys, schedules and webhooks"),
        ("enable", _enable, "enable a disabled tenant"),
    ):
        command(tsub, name, text, func).add_argument("name", help="the tenant's name")
    g = command(tsub, "grant-s3", "let a tenant read an s3:// location", _grant_s3)
    g.add_argument("--tenant", required=True, help="the tenant's name")
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
    r = command(tsub, "revoke-s3", "withdraw an s3:// grant", _revoke_s3)
    r.add_argument("--tenant", required=True, help="the tenant's name")
    r.add_argument("location", help="the granted location, exactly as granted")
    for name, func, text in (
        ("grant-hub-push", _grant_hub_push, "let a tenant push to a Hub user/organisation"),
        ("revoke-hub-push", _revoke_hub_push, "withdraw a Hub push grant"),
    ):
        p = command(tsub, name, text, func)
        p.add_argument("--tenant", required=True, help="the tenant's name")
        p.add_argument("namespace", help="a Hub user or organisation name")
    h = command(
        tsub,
        "grant-hub-token",
        "let a tenant use the service's Hub token (WEIGHTSMITH_HF_TOKEN)",
        _service_hub_token,
    )
    h.add_argument("--tenant", required=True, help="the tenant's name")
    h.add_argument("--revoke", action="store_true", help="withdraw it instead")

    s = sub.add_parser(
        "secrets", help="operator: keys that encrypt stored secrets", formatter_class=formatter
    )
    ssub = s.add_subparsers(dest="secrets_command", required=True)
    command(ssub, "new-key", "print a new key for WEIGHTSMITH_SECRET_KEYS", cmd_secrets_new_key)
    command(ssub, "rotate", "re-seal every stored secret with the first key", cmd_secrets_rotate)
