"""``weightsmith push`` as a real process against a real ``weightsmith serve`` (SQLite, local
artifact directory, in-process worker): a tiny real checkpoint goes in as an artifact and a
merge uses it; bad input exits 2, an unreachable service or a rejected key exits 1; a chunk
cut off by a dropped connection stores nothing.

Expected values are computed here: digests with hashlib on the local files and on the
objects in the service's artifact directory, merged weights as the mean of the inputs.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

from tests.support.checkpoints import linear, tensors
from tests.support.serve import Server, free_port, write_recipe
from weightsmith.client import Client

pytestmark = pytest.mark.slow  # a server and CLI subprocesses


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("weightsmith: error: "), stderr
    return lines[0]


def test_push_publishes_a_checkpoint_that_a_merge_then_takes_as_input(
    server: Server, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    pushed = server.cli("push", str(llama_family["ft1"]), "artifact://ft1", "--description", "x")
    assert pushed.returncode == 0, pushed.stderr + server.log.read_text()[-3000:]
    # not a terminal: a plain line per phase and per file, the upload id, the reference
    lines = pushed.stdout.splitlines()
    phases = [ln.split(":")[0] for ln in lines if ": 5 files, " in ln]
    assert phases[0] == "hashing" and phases[2:] == ["uploading", "completing"]
    assert phases[1].startswith("upload up_")
    assert "sending model.safetensors" in lines
    assert lines[-1] == "pushed artifact://ft1@1"
    assert server.cli("push", str(llama_family["ft2"]), "ft2").stdout.endswith(
        "pushed artifact://ft2@1\n"
    )
    for f in llama_family["ft1"].iterdir():
        assert sha256(server.stored("ft1", 1) / f.name) == sha256(f)

    recipe = write_recipe(tmp_path, "soup", linear("artifact://ft1@1", "artifact://ft2@1"))
    merged = server.cli("submit", str(recipe), "--wait")

    assert merged.returncode == 0, merged.stderr + server.log.read_text()[-3000:]
    assert "published artifact://soup@1" in merged.stdout
    out, a, b = (
        tensors(server.stored("soup", 1)),
        tensors(llama_family["ft1"]),
        tensors(llama_family["ft2"]),
    )
    assert out.keys() == a.keys()
    for key in out:
        torch.testing.assert_close(out[key], (0.5 * a[key] + 0.5 * b[key]).to(out[key].dtype))


def test_push_exits_2_for_bad_input_before_sending_anything(server: Server, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes(b"w")

    cases = {
        "pickle": server.cli("push", str(pickled), "artifact://x"),
        "without '@3'": server.cli("push", str(plain), "artifact://x@3"),
        "neither a file nor a folder": server.cli("push", str(tmp_path / "nope"), "x"),
        "artifact name": server.cli("push", str(plain), "artifact://Not_Valid"),
    }

    for why, done in cases.items():
        assert done.returncode == 2, (why, done.stderr)
        assert why in error_line(done.stderr)
    assert not (server.data_dir / "artifacts" / "default" / "x").exists()


def test_push_exits_1_for_an_unreachable_service_or_a_rejected_key(
    server: Server, tmp_path: Path
) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"w")

    rejected = server.cli("push", str(folder), "x", token="wsk_nope_nope")
    unreachable = server.cli("push", str(folder), "x", url=f"http://127.0.0.1:{free_port()}")

    assert rejected.returncode == 1
    assert "check --token" in error_line(rejected.stderr)
    assert unreachable.returncode == 1
    assert "cannot reach" in error_line(unreachable.stderr)


def test_a_chunk_cut_off_by_a_dropped_connection_stores_nothing_and_push_resumes(
    server: Server, tmp_path: Path
) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes
    folder = tmp_path / "cut"
    folder.mkdir()
    (folder / "data.safetensors").write_bytes(data)
    declared = [
        {
            "path": "data.safetensors",
            "size": len(data),
            "sha256": sha256(folder / "data.safetensors"),
        }
    ]
    with Client(server.url, server.key) as client:
        upload_id = client.create_upload("cut", declared).id

        # a PUT whose connection breaks after 4000 of the 10240 bytes announced
        url = urlsplit(server.url)
        with socket.create_connection((url.hostname, url.port)) as s:
            head = (
                f"PUT /v1/uploads/{upload_id}/files/data.safetensors HTTP/1.1\r\n"
                f"Host: {url.netloc}\r\nAuthorization: Bearer {server.key}\r\n"
                f"Content-Range: bytes 0-{len(data) - 1}/{len(data)}\r\n"
                f"Content-Length: {len(data)}\r\n\r\n"
            )
            s.sendall(head.encode() + data[:4000])

        view = client.get_upload(upload_id)
        assert view.files[0].offset == 0
        assert view.state == "open"

    resumed = server.cli("push", str(folder), "artifact://cut", "--resume", upload_id)

    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.endswith("pushed artifact://cut@1\n")
    assert (server.stored("cut", 1) / "data.safetensors").read_bytes() == data
    assert "Traceback" not in server.log.read_text()
