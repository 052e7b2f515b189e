"""What the remote commands share: each talks to a running service through
:mod:`weightsmith.client` (URL and key from ``--url``/``--token`` or ``WEIGHTSMITH_URL`` /
``WEIGHTSMITH_TOKEN``), and every :class:`~weightsmith.client.ClientError` becomes one error
line and the exit code of :mod:`weightsmith.cli.common`. Nothing here imports torch.

The commands themselves: :mod:`weightsmith.cli.jobs` (submit, jobs, job, cancel),
:mod:`weightsmith.cli.artifacts` (artifacts, pull, push), :mod:`weightsmith.cli.account`
(tenant, hub-token).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from weightsmith.cli.common import EXIT_FAILURE, EXIT_INPUT, fail

ClientCommand = Callable[[Any, argparse.Namespace], int]
CLIENT_BACKOFF_S = 0.25  # an unreachable service is reported after ~2 s of retries


def remote(run: ClientCommand) -> Callable[[argparse.Namespace], int]:
    """A client subcommand: a Client for ``run``, and every ClientError as one line."""

    def command(args: argparse.Namespace) -> int:
        from weightsmith.client import Client, ClientError

        try:
            with Client(args.url, args.token, backoff_s=CLIENT_BACKOFF_S) as client:
                return run(client, args)
        except ClientError as e:
            return fail(error_line(e), exit_code(e))

    command.__doc__ = run.__doc__
    return command


def error_line(e: Any) -> str:
    """The error as the user reads it, with a hint where the key was refused."""
    from weightsmith.client import TOKEN_ENV

    if e.status in (401, 403):
        return f"{e}; check --token or {TOKEN_ENV}"
    return str(e)


def exit_code(e: Any) -> int:
    """2 when the input was wrong (see ClientError.bad_input), else 1."""
    return EXIT_INPUT if e.bad_input else EXIT_FAILURE


class Remote:
    """Makes the parsers of remote commands: each takes ``--url`` and ``--token`` after its
    name too (``weightsmith jobs --url …``), as well as before it."""

    def __init__(self, sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
        self.sub = sub
        self.formatter = formatter
        self.connection = argparse.ArgumentParser(add_help=False)
        self.connection.add_argument(
            "--url", default=argparse.SUPPRESS, help="service URL (default: $WEIGHTSMITH_URL)"
        )
        self.connection.add_argument(
            "--token", default=argparse.SUPPRESS, help="API key (default: $WEIGHTSMITH_TOKEN)"
        )

    def command(
        self, name: str, help: str, run: ClientCommand | None = None, *, group: Any = None
    ) -> argparse.ArgumentParser:
        """A subcommand ``name`` running ``run`` with a client (a group of subcommands when
        ``run`` is None)."""
        parser: argparse.ArgumentParser = (group or self.sub).add_parser(
            name,
            help=help,
            description=run.__doc__ if run is not None else help,
            parents=[self.connection],
            formatter_class=self.formatter,
        )
        if run is not None:
            parser.set_defaults(func=remote(run))
        return parser
