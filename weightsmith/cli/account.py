"""Remote commands for the tenant's own account: ``tenant`` (what it may name) and
``hub-token`` (its Hugging Face token, stored encrypted by the service). A token is never
taken as a command-line argument: it is read from a prompt or standard input."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from weightsmith.cli.common import EXIT_INPUT, add_json_option, fail, print_json, when
from weightsmith.cli.remote import Remote


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
    if args.json:
        print_json(view)
        return 0
    token = view.hub_token
    used = {"tenant": "yours", "operator": "the service's", None: "none"}[token.used]
    print(f"tenant:     {view.name}")
    print(f"hub token:  {used}" + (f" (set {when(token.set_at)})" if token.configured else ""))
    print(f"hub push:   {', '.join(view.hub_push_namespaces) or '-'}")
    for grant in view.s3_grants:
        print(f"s3 grant:   {grant.location}" + (f" at {grant.endpoint}" if grant.endpoint else ""))
    if not view.s3_grants:
        print("s3 grant:   -")
    print(f"local paths: {'allowed' if view.local_paths else 'refused'}")
    return 0


def add_commands(remote: Remote) -> None:
    """Register ``hub-token`` and ``tenant``."""
    ht = remote.command("hub-token", "store or forget your Hugging Face token with the service")
    htsub = ht.add_subparsers(dest="hub_token_command", required=True)
    remote.command(
        "set", "store it (typed at a prompt, or piped on stdin)", _hub_token_set, group=htsub
    )
    remote.command("clear", "forget it", _hub_token_clear, group=htsub)
    tv = remote.command("tenant", "show what your tenant may name (grants, Hub token)", _tenant)
    add_json_option(tv, "the tenant as the API returns it")
