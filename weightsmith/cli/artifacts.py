"""Remote commands for artifacts: list ``artifacts`` (or one's versions), ``pull`` a version
(every sha256 verified), ``push`` a local folder as the next version."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from weightsmith.cli.common import (
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    add_json_option,
    fail,
    human_bytes,
    print_json,
    table,
    when,
)
from weightsmith.cli.progress import DownloadWatch, PushWatch
from weightsmith.cli.remote import Remote, error_line, exit_code


def _artifacts(client: Any, args: argparse.Namespace) -> int:
    """List the latest version of each artifact, or every version of NAME."""
    if args.name is None:
        latest = client.list_artifacts()
        if args.json:
            print_json(latest)
            return 0
        if not latest:
            print("no artifacts")
            return 0
        rows = [[v.name, str(v.version), v.reference, when(v.published_at)] for v in latest]
        table(["NAME", "LATEST", "REFERENCE", "PUBLISHED"], rows)
        return 0
    versions = client.list_versions(args.name)
    if args.json:
        print_json(versions)
        return 0
    rows = [[str(v.version), v.reference, when(v.published_at)] for v in versions]
    table(["VERSION", "REFERENCE", "PUBLISHED"], rows)
    return 0


def _pull(client: Any, args: argparse.Namespace) -> int:
    """Download an artifact version, verifying every file's sha256; a failed or
    interrupted pull leaves nothing behind."""
    watch = DownloadWatch(tty=sys.stderr.isatty())
    try:
        dest = client.download(args.artifact, args.dir, on_progress=watch)
    except KeyboardInterrupt:
        return fail("interrupted; nothing was written", EXIT_INTERRUPTED)
    finally:
        watch.close()
    manifest = json.loads((dest / "manifest.json").read_text())
    files = manifest["files"]
    total = sum(int(f["size"]) for f in files)
    pinned = (manifest.get("artifact") or {}).get("reference") or args.artifact
    print(
        f"pulled {pinned} into {dest}: {len(files)} files, "
        f"{human_bytes(total)}, every sha256 verified"
    )
    return 0


def _push(client: Any, args: argparse.Namespace) -> int:
    """Upload a folder (or one file) as the next version of an artifact of yours."""
    from weightsmith.client import ClientError, UploadError, parse_artifact_ref

    ref = parse_artifact_ref(args.artifact)  # a malformed one: exit 2, nothing sent
    if ref.version is not None:
        return fail(
            f"push publishes the next version of {ref.name!r}: write artifact://{ref.name} "
            f"(without '@{ref.version}')",
            EXIT_INPUT,
        )
    watch = PushWatch(tty=sys.stderr.isatty())
    try:
        version = client.upload(
            args.dir,
            ref.name,
            description=args.description,
            on_progress=watch,
            upload_id=args.resume,
        )
    except ClientError as e:
        hint = ""
        if isinstance(e, UploadError) and e.upload_id and e.status != 404:  # 404: gone
            again = f"weightsmith push {args.dir} {args.artifact} --resume {e.upload_id}"
            hint = f"; go on with '{again}'"
        return fail(f"{error_line(e)}{hint}", exit_code(e))
    except KeyboardInterrupt:
        resume = f" --resume {watch.upload_id}" if watch.upload_id else ""
        return fail(
            f"interrupted; nothing was published. Go on with 'weightsmith push {args.dir} "
            f"{args.artifact}{resume}'",
            EXIT_INTERRUPTED,
        )
    finally:
        watch.close()
    print(f"pushed {version.reference}")
    return 0


def add_commands(remote: Remote) -> None:
    """Register ``artifacts``, ``pull`` and ``push``."""
    ar = remote.command(
        "artifacts", "list published artifacts, or the versions of NAME", _artifacts
    )
    ar.add_argument("name", nargs="?", metavar="NAME", help="list this artifact's versions")
    add_json_option(ar, "the versions (a list, as the API returns each)")

    pl = remote.command("pull", "download an artifact version, verifying every sha256", _pull)
    pl.add_argument("artifact", metavar="REF", help="artifact://name@version (or @latest)")
    pl.add_argument("dir", metavar="DIR", help="target directory (must not exist, or be empty)")

    ps = remote.command(
        "push", "upload a folder as the next version of an artifact (safetensors)", _push
    )
    ps.add_argument("dir", metavar="DIR", help="a checkpoint folder, or one file")
    ps.add_argument("artifact", metavar="REF", help="artifact://name (or name)")
    ps.add_argument("--description", help="kept in the version's manifest")
    ps.add_argument("--resume", metavar="UPLOAD_ID", help="go on with an interrupted upload")
