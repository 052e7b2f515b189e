"""Checkpoint I/O: lazy reader, streaming sharded writer, and every corruption the reader
must turn into a CheckpointError that names the file and the tensor.

Files are written with the safetensors library (or by hand, byte by byte, for corrupt
ones), and outputs are checked with safetensors.torch.load_file, an independent reader.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from workers.errors import CheckpointError
from workers.tensors import (
    CheckpointReader,
    ShardedWriter,
    TensorInfo,
    TensorSpec,
    plan_shards,
)
from workers.tensors.safetensors_format import MAX_HEADER_BYTES

# -- helpers -----------------------------------------------------------------------------


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.w_f16": torch.randn(4, 6, generator=g).to(torch.float16),
        "model.layers.0.w_f32": torch.randn(5, 3, generator=g),
        "model.layers.0.w_f64": torch.randn(3, generator=g).to(torch.float64),
        "model.ids": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        "model.i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "model.u8": torch.tensor([0, 1, 255], dtype=torch.uint8),
        "model.mask": torch.tensor([[True, False, True], [False, False, True]]),
        "model.scale": torch.tensor(0.125),  # 0-dim
        "model.scale_bf16": torch.tensor(-3.5, dtype=torch.bfloat16),
        "model.empty": torch.empty(0, 4),  # zero-size
        "model.empty_i64": torch.empty(2, 0, dtype=torch.int64),
        "model.f8": torch.randn(7, generator=g).to(torch.float8_e4m3fn),
    }


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN-safe, works for bool/float8/0-dim)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def write_raw(
    path: Path, header: dict[str, Any] | bytes, data: bytes = b"", *, header_len: int | None = None
) -> Path:
    """A safetensors file built by hand, so that any part of it can be wrong."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def open_error(path: Path, **kwargs: Any) -> CheckpointError:
    with pytest.raises(CheckpointError) as excinfo:
        CheckpointReader(path, label="m", **kwargs)
    err = excinfo.value
    assert err.model == "m"
    return err


def save_sharded(root: Path, tensors: dict[str, torch.Tensor], groups: list[list[str]]) -> None:
    """A sharded checkpoint with an index, like transformers' save_pretrained makes."""
    root.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, root / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))


# -- reader: round trips -----------------------------------------------------------------


def test_single_file_round_trip_is_bit_exact(tmp_path: Path) -> None:
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt", "k": "v"})
    with CheckpointReader(tmp_path) as r:
        assert r.names == sorted(tensors)
        assert r.metadata == {"format": "pt", "k": "v"}
        assert r.files() == [tmp_path / "model.safetensors"]
        assert r.total_bytes() == sum(t.numel() * t.element_size() for t in tensors.values())
        for name, expected in tensors.items():
            got = r.read(name)
            assert bit_equal(got, expected), name
            assert got.is_contiguous()
            assert name in r
            info = r.info(name)
            assert info.shape == tuple(expected.shape)
            assert info.torch_dtype == expected.dtype
            assert info.nbytes == expected.numel() * expected.element_size()
            assert info.numel == expected.numel()
    assert "missing" not in r
    assert 3 not in r


def test_read_returns_independent_memory(tmp_path: Path) -> None:
    save_file({"w": torch.ones(4)}, tmp_path / "x.safetensors")
    with CheckpointReader(tmp_path / "x.safetensors") as r:
        a = r.read("w")
        a.add_(1)
        assert torch.equal(r.read("w"), torch.ones(4))
        assert a.untyped_storage().nbytes() == 16  # exactly one tensor's buffer


def test_tensor_info_offsets_point_at_the_bytes(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    raw = path.read_bytes()
    with CheckpointReader(path) as r:
        for name, expected in tensors.items():
            info = r.info(name)
            assert isinstance(info, TensorInfo)
            assert info.file == path
            chunk = raw[info.start : info.end]
            assert chunk == expected.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_sharded_directory_with_index(tmp_path: Path) -> None:
    tensors = sample_tensors()
    names = list(tensors)
    save_sharded(tmp_path, tensors, [names[:4], names[4:9], names[9:]])
    with CheckpointReader(tmp_path, label="sharded") as r:
        assert r.label == "sharded"
        assert r.names == sorted(tensors)
        assert [f.name for f in r.files()] == [
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors",
        ]
        assert r.metadata == {"format": "pt"}
        assert r.info(names[5]).file.name == "model-00002-of-00003.safetensors"
        for name in reversed(names):
            assert bit_equal(r.read(name), tensors[name]), name


def test_directory_of_unindexed_safetensors_files(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "part-a.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "part-b.safetensors")
    with CheckpointReader(tmp_path) as r:
        assert r.names == ["a", "b"]
        assert torch.equal(r.read("b"), torch.zeros(3))


def test_label_defaults_to_path(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    with CheckpointReader(str(tmp_path)) as r:
        assert r.label == str(tmp_path)


def test_missing_tensor_names_it_and_suggests(tmp_path: Path) -> None:
    save_file({"model.norm.weight": torch.ones(2)}, tmp_path / "model.safetensors")
    with CheckpointReader(tmp_path, label="m") as r, pytest.raises(CheckpointError) as e:
        r.read("model.norm.weights")
    assert e.value.tensor == "model.norm.weights"
    assert e.value.model == "m"
    assert "model.norm.weight'" in str(e.value)  # the close match


def test_read_after_close_is_refused(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    r = CheckpointReader(tmp_path)
    r.read("a")
    r.close()
    with pytest.raises(ValueError, match="closed"):
        r.read("a")


# -- reader: locating --------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    err = open_error(tmp_path / "nope")
    assert "no checkpoint found" in err.message
    assert "does not exist" in err.message
    assert "model.safetensors" in err.message


def test_empty_directory_lists_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    err = open_error(tmp_path)
    assert "no checkpoint found" in err.message
    for looked in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        assert looked in err.message


def test_single_file_of_unknown_kind(tmp_path: Path) -> None:
    p = tmp_path / "weights.npz"
    p.write_bytes(b"x" * 16)
    err = open_error(p)
    assert err.file == "weights.npz"


# -- reader: corrupt safetensors files ----------------------------------------------------


def test_file_shorter_than_8_bytes(tmp_path: Path) -> None:
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"\x01\x02\x03")
    err = open_error(tmp_path)
    assert err.file == "model.safetensors"
    assert "3 bytes" in err.message
    assert "'model.safetensors'" in str(err)


def test_header_length_past_end_of_file(tmp_path: Path) -> None:
    p = write_raw(tmp_path / "model.safetensors", b"{}", header_len=1000)
    err = open_error(p)
    assert err.file == "model.safetensors"
    assert "header length 1000" in err.message
    assert "10 bytes" in err.message  # the file's size


def test_header_length_over_100mb(tmp_path: Path) -> None:
    p = tmp_path / "model.safetensors"
    with p.open("wb") as f:  # sparse: takes no disk space
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        f.truncate(MAX_HEADER_BYTES + 100)
    err = open_error(p)
    assert err.file == "model.safetensors"
    assert "limit" in err.message


def test_header_not_utf8(tmp_path: Path) -> None:
    p = write_raw(tmp_path / "model.safetensors", b'{"\xff\xfe": 1}')
    err = open_error(p)
    assert err.file == "model.safetensors"
    assert "UTF-8" in err.message


def test_header_not_json(tmp_path: Path) -> None:
    p = write_raw(tmp_path / "model.safetensors", b'{"a": {"dtype": "F32",')
    err = open_error(p)
    assert err.file == "model.safetensors"
    assert "not valid JSON" in err.message


def test_header_not_an_object(tmp_path: Path) -> None:
    p = write_raw(tmp_path / "model.safetensors", b"[1, 2]")
    err = open_error(p)
    assert "JSON object" in err.message


def test_header_with_duplicate_tensor(tmp_path: Path) -> None:
    body = (
        b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
        b' "w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}'
    )
    p = write_raw(tmp_path / "model.safetensors", body, b"\x00\x00")
    err = open_error(p)
    assert err.tensor == "w"
    assert "twice" in err.message


@pytest.mark.parametrize("missing", ["dtype", "shape", "data_offsets"])
def test_entry_missing_a_field(tmp_path: Path, missing: str) -> None:
    e = entry("F32", [2], 0, 8)
    del e[missing]
    p = write_raw(tmp_path / "model.safetensors", {"layer.w": e}, bytes(8))
    err = open_error(p)
    assert err.file == "model.safetensors"
    assert err.tensor == "layer.w"
    assert missing in err.message
    assert "'layer.w'" in str(err)


def test_unknown_dtype_lists_valid_ones(tmp_path: Path) -> None:
    p = write_raw(tmp_path / "model.safetensors", {"layer.w": entry("F128", [1], 0, 16)}, bytes(16))
    err = open_error(p)
    assert err.tensor == "layer.w"
    assert "'F128'" in err.message
    for valid in ("F32", "BF16", "I64", "BOOL"):
        assert valid in err.message


def test_negative_dimension(tmp_path: Path) -> None:
    p = write_raw(tmp_path / "model.safetensors", {"w": entry("F32", [-1, 2], 0, 0)})
    err = open_error(p)
    assert err.tensor == "w"
    assert "negative" in err.message


@pytest.mark.parametrize("shape", [["2"], 3, [2.0]])
def test_malformed_shape(tmp_path: Path, shape: Any) -> None:
    e = {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}
    p = write_raw(tmp_path / "model.safetensors", {"w": e}, bytes(8))
    assert open_error(p).tensor == "w"


def test_size_mismatch(tmp_path: Path) -> None:
    # 2x3 F32 needs 24 bytes; the entry claims 20.
    p = write_raw(tmp_path / "model.safetensors", {"w": entry("F32", [2, 3], 0, 20)}, bytes(24))
    err = open_error(p)
    assert err.file == "model.safetensors"
    assert err.tensor == "w"
    assert "20 bytes" in err.message
    assert "24 bytes" in err.message


def test_inverted_offsets(tmp_path: Path) -> None:
    p = write_raw(tmp_path / "model.safetensors", {"w": entry("U8", [0], 4, 2)}, bytes(4))
    assert open_error(p).tensor == "w"


def test_offsets_past_end_of_file(tmp_path: Path) -> None:
    header = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [4], 8, 24)}
    body = json.dumps(header).encode()
    p = write_raw(tmp_path / "model.safetensors", body, bytes(16))
    err = open_error(p)
    end = 8 + len(body) + 24
    size = 8 + len(body) + 16
    assert err.tensor == "b"
    assert err.message == (
        f"file is truncated: tensor 'b' ends at byte {end} but the file has {size} bytes"
    )


def test_truncated_real_file(tmp_path: Path) -> None:
    tensors = sample_tensors()
    p = tmp_path / "model.safetensors"
    save_file(tensors, p)
    with CheckpointReader(p) as r:
        last = max((r.info(n) for n in r.names), key=lambda i: i.end)
    size = p.stat().st_size
    with p.open("r+b") as f:
        f.truncate(size - 3)
    err = open_error(tmp_path)
    assert err.file == "model.safetensors"
    assert err.tensor == last.name
    assert f"ends at byte {last.end} but the file has {size - 3} bytes" in err.message


def test_file_truncated_after_open(tmp_path: Path) -> None:
    p = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, p)
    with CheckpointReader(p, label="m") as r:
        with p.open("r+b") as f:
            f.truncate(p.stat().st_size - 100)
        with pytest.raises(CheckpointError) as e:
            r.read("w")
    assert e.value.tensor == "w"
    assert e.value.file == "model.safetensors"
    assert "truncated" in e.value.message


def test_overlapping_tensors(tmp_path: Path) -> None:
    header = {"a": entry("F32", [4], 0, 16), "b": entry("F32", [2], 8, 16)}
    p = write_raw(tmp_path / "model.safetensors", header, bytes(16))
    err = open_error(p)
    assert err.file == "model.safetensors"
    assert "overlaps" in err.message
    assert "'a'" in err.message
    assert "'b'" in err.message


def test_zero_size_tensors_do_not_overlap(tmp_path: Path) -> None:
    header = {"a": entry("F32", [2], 0, 8), "e": entry("F32", [0], 4, 4)}
    p = write_raw(tmp_path / "model.safetensors", header, bytes(8))
    with CheckpointReader(p) as r:
        assert r.read("e").shape == (0,)


def test_bad_metadata(tmp_path: Path) -> None:
    header = {"__metadata__": {"n": 1}, "a": entry("U8", [1], 0, 1)}
    p = write_raw(tmp_path / "model.safetensors", header, bytes(1))
    assert "__metadata__" in open_error(p).message


# -- reader: inconsistent sharded checkpoints ---------------------------------------------


def two_shards(root: Path) -> None:
    save_sharded(
        root,
        {"a": torch.ones(2), "b": torch.zeros(3), "c": torch.ones(1)},
        [["a", "b"], ["c"]],
    )


def test_index_not_json(tmp_path: Path) -> None:
    two_shards(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {')
    err = open_error(tmp_path)
    assert err.file == "model.safetensors.index.json"
    assert "not valid JSON" in err.message


def test_index_without_weight_map(tmp_path: Path) -> None:
    two_shards(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    err = open_error(tmp_path)
    assert err.file == "model.safetensors.index.json"
    assert "weight_map" in err.message


def test_missing_shard(tmp_path: Path) -> None:
    two_shards(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    err = open_error(tmp_path)
    assert err.file == "model-00002-of-00002.safetensors"
    assert err.tensor == "c"
    assert "does not exist" in err.message


def test_tensor_missing_from_its_shard(tmp_path: Path) -> None:
    two_shards(tmp_path)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["d"] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    err = open_error(tmp_path)
    assert err.file == "model-00002-of-00002.safetensors"
    assert err.tensor == "d"
    assert "does not contain" in err.message


def test_tensor_in_two_shards(tmp_path: Path) -> None:
    two_shards(tmp_path)
    save_file(
        {"c": torch.ones(1), "a": torch.ones(2)}, tmp_path / "model-00002-of-00002.safetensors"
    )
    err = open_error(tmp_path)
    assert err.tensor == "a"
    assert "model-00001-of-00002.safetensors" in err.message
    assert "model-00002-of-00002.safetensors" in err.message


def test_duplicate_across_unindexed_files(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "one.safetensors")
    save_file({"a": torch.ones(2)}, tmp_path / "two.safetensors")
    err = open_error(tmp_path)
    assert err.tensor == "a"
    assert err.file == "two.safetensors"


def test_index_pointing_outside_the_directory(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({"a": torch.ones(2)}, tmp_path / "outside.safetensors")
    index = {"weight_map": {"a": "../outside.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    err = open_error(ckpt)
    assert err.tensor == "a"
    assert "outside" in err.message


def test_symlinked_shards_like_the_hub_cache(tmp_path: Path) -> None:
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    two_shards(blobs)
    snapshot.mkdir(parents=True)
    for f in blobs.iterdir():
        (snapshot / f.name).symlink_to(f)
    with CheckpointReader(snapshot) as r:
        assert r.names == ["a", "b", "c"]
        assert torch.equal(r.read("c"), torch.ones(1))


def test_corrupt_shard_names_the_shard(tmp_path: Path) -> None:
    two_shards(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\x00" * 4)
    err = open_error(tmp_path)
    assert err.file == "model-00002-of-00002.safetensors"


# -- reader: pickle checkpoints ----------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _StateDict(collections.OrderedDict[str, torch.Tensor]):
    pass


def test_pickle_refused_by_default(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(3)}, tmp_path / "pytorch_model.bin")
    err = open_error(tmp_path)
    assert err.file == "pytorch_model.bin"
    assert "allow_pickle: true" in err.message
    assert "weights_only=True" in err.message
    assert "execute" in err.message


def test_pickle_file_path_refused_by_default(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(3)}, tmp_path / "weights.pt")
    assert "allow_pickle" in open_error(tmp_path / "weights.pt").message


def test_pickle_loaded_when_allowed(tmp_path: Path) -> None:
    tensors = sample_tensors()
    tensors["model.transposed"] = torch.randn(3, 5).t()  # not contiguous
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with CheckpointReader(tmp_path, allow_pickle=True) as r:
        assert r.names == sorted(tensors)
        assert r.files() == [tmp_path / "pytorch_model.bin"]
        for name, expected in tensors.items():
            got = r.read(name)
            assert got.is_contiguous()
            assert bit_equal(got, expected), name
            assert r.info(name).torch_dtype == expected.dtype
        a = r.read("model.layers.0.w_f32")
        a.zero_()
        assert bit_equal(r.read("model.layers.0.w_f32"), tensors["model.layers.0.w_f32"])


def test_sharded_pickle_loads_one_file_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = {"a": torch.ones(2), "b": torch.full((2,), 2.0)}, {"c": torch.arange(3)}
    torch.save(a, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(b, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {
        "weight_map": {
            "a": "pytorch_model-00001-of-00002.bin",
            "b": "pytorch_model-00001-of-00002.bin",
            "c": "pytorch_model-00002-of-00002.bin",
        }
    }
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))

    loads: list[str] = []
    real_load = torch.load

    def counting_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        assert kwargs["weights_only"] is True
        loads.append(Path(f).name)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    with CheckpointReader(tmp_path, allow_pickle=True) as r:
        assert r.names == ["a", "b", "c"]
        loads.clear()
        assert torch.equal(r.read("c"), torch.arange(3))  # shard 2 is the one kept loaded
        assert loads == []
        assert torch.equal(r.read("a"), torch.ones(2))
        assert torch.equal(r.read("b"), torch.full((2,), 2.0))
        assert loads == ["pytorch_model-00001-of-00002.bin"]
        r.read("c")
        assert loads == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]


def test_pickle_without_index_and_legacy_format(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(
        {"b": torch.zeros(2, dtype=torch.int64)},
        tmp_path / "pytorch_model-00002-of-00002.bin",
        _use_new_zipfile_serialization=False,  # cannot be mmapped
    )
    with CheckpointReader(tmp_path, allow_pickle=True) as r:
        assert r.names == ["a", "b"]
        assert torch.equal(r.read("b"), torch.zeros(2, dtype=torch.int64))


def test_pickle_code_execution_is_blocked_even_when_allowed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(1), "x": _Evil(marker)}, tmp_path / "pytorch_model.bin")
    err = open_error(tmp_path, allow_pickle=True)
    assert err.file == "pytorch_model.bin"
    assert "weights_only=True" in err.message
    assert "system" in err.message  # the refused global
    assert not marker.exists()


def test_pickle_with_custom_class_is_rejected(tmp_path: Path) -> None:
    state = _StateDict(w=torch.ones(1))
    torch.save(state, tmp_path / "model.pth")
    err = open_error(tmp_path, allow_pickle=True)
    assert err.file == "model.pth"
    assert "_StateDict" in err.message


def test_pickle_with_non_tensor_entry(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1), "step": 3}, tmp_path / "pytorch_model.bin")
    err = open_error(tmp_path, allow_pickle=True)
    assert err.tensor == "step"
    assert "int" in err.message


def test_pickle_index_lists_missing_tensor(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00001.bin")
    index = {
        "weight_map": {
            "a": "pytorch_model-00001-of-00001.bin",
            "z": "pytorch_model-00001-of-00001.bin",
        }
    }
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    err = open_error(tmp_path, allow_pickle=True)
    assert err.tensor == "z"
    assert err.file == "pytorch_model-00001-of-00001.bin"


def test_safetensors_preferred_over_pickle(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    save_file({"w": torch.ones(1)}, tmp_path / "model.safetensors")
    with CheckpointReader(tmp_path) as r:  # no allow_pickle needed
        assert torch.equal(r.read("w"), torch.ones(1))


# -- writer ------------------------------------------------------------------------------


def specs_of(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


def test_tensor_spec_nbytes() -> None:
    assert TensorSpec("a", torch.bfloat16, (3, 4)).nbytes == 24
    assert TensorSpec("s", torch.float32, ()).nbytes == 4
    assert TensorSpec("z", torch.float32, (0, 7)).nbytes == 0
    assert TensorSpec("l", torch.int64, torch.Size([2])).shape == (2,)


def test_plan_shards_is_greedy_and_respects_the_limit() -> None:
    sizes = [40, 30, 30, 10, 100, 5, 0, 60]
    specs = [TensorSpec(f"t{i}", torch.uint8, (n,)) for i, n in enumerate(sizes)]
    shards = plan_shards(specs, 100)
    assert [[s.name for s in shard] for shard in shards] == [
        ["t0", "t1", "t2"],
        ["t3"],
        ["t4"],
        ["t5", "t6", "t7"],
    ]
    assert [s for shard in shards for s in shard] == specs  # order kept, nothing lost
    for shard in shards:
        assert sum(s.nbytes for s in shard) <= 100


def test_plan_shards_oversized_tensor_gets_its_own_shard() -> None:
    specs = [TensorSpec("a", torch.uint8, (5,)), TensorSpec("big", torch.uint8, (500,))]
    assert [[s.name for s in sh] for sh in plan_shards(specs, 100)] == [["a"], ["big"]]
    assert plan_shards([], 100) == []
    with pytest.raises(ValueError):
        plan_shards(specs, 0)


def test_writer_round_trip_through_safetensors_and_reader(tmp_path: Path) -> None:
    tensors = sample_tensors()
    out = tmp_path / "out"
    w = ShardedWriter(out, specs_of(tensors), max_shard_bytes=200, metadata={"merge": "ties"})
    for name, t in tensors.items():
        w.write(name, t)
    assert w.bytes_written == w.total_bytes == sum(s.nbytes for s in specs_of(tensors))
    paths = w.close()

    shards = [p for p in paths if p.name.endswith(".safetensors")]
    assert len(shards) > 1
    assert paths[-1] == out / "model.safetensors.index.json"
    n = len(shards)
    assert [p.name for p in shards] == [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    assert sorted(out.iterdir()) == sorted(paths)

    assert w.digests == {
        p.name: (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths
    }
    index = json.loads(paths[-1].read_text())
    assert index["metadata"]["total_size"] == w.total_bytes
    assert set(index["weight_map"]) == set(tensors)

    loaded: dict[str, torch.Tensor] = {}
    for shard in shards:
        raw = shard.read_bytes()
        (header_len,) = struct.unpack("<Q", raw[:8])
        assert (8 + header_len) % 8 == 0
        with safe_open(str(shard), "pt") as f:
            assert f.metadata() == {"format": "pt", "merge": "ties"}
        part = load_file(shard)
        for name in part:
            assert index["weight_map"][name] == shard.name
        loaded.update(part)
        assert shard.stat().st_size <= 200 + 8 + header_len or len(part) == 1
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert bit_equal(loaded[name], t), name

    with CheckpointReader(out) as r:
        assert r.metadata["merge"] == "ties"
        for name, t in tensors.items():
            assert bit_equal(r.read(name), t), name


def test_writer_single_shard_still_has_an_index(tmp_path: Path) -> None:
    tensors = {"b": torch.ones(2), "a": torch.zeros(3, dtype=torch.bfloat16)}
    with ShardedWriter(tmp_path, specs_of(tensors)) as w:
        for name, t in tensors.items():
            w.write(name, t)
    paths = w.close()  # idempotent after the context manager closed it
    assert [p.name for p in paths] == [
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    ]
    loaded = load_file(paths[0])
    assert all(bit_equal(loaded[n], t) for n, t in tensors.items())
    # Data offsets follow write order, not name order.
    raw = paths[0].read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert header["b"]["data_offsets"] == [0, 8]
    assert header["a"]["data_offsets"] == [8, 14]


def test_writer_accepts_non_contiguous_and_grad_tensors(tmp_path: Path) -> None:
    base = torch.randn(4, 6)
    tensors = {"t": base.t(), "g": torch.randn(3, requires_grad=True), "s": base[1:3, ::2]}
    w = ShardedWriter(tmp_path, specs_of(tensors))
    for name, t in tensors.items():
        w.write(name, t)
    loaded = load_file(w.close()[0])
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t.detach()), name


def test_writer_rejects_out_of_order(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(1), "b": torch.ones(1), "c": torch.ones(1)}
    w = ShardedWriter(tmp_path, specs_of(tensors))
    with pytest.raises(ValueError, match=r"expected 'a'.*got 'b'"):
        w.write("b", tensors["b"])
    w.write("a", tensors["a"])
    with pytest.raises(ValueError, match="already written"):
        w.write("a", tensors["a"])
    with pytest.raises(ValueError, match="not in the output plan"):
        w.write("zzz", tensors["a"])
    w.abort()


def test_writer_rejects_wrong_dtype_and_shape(tmp_path: Path) -> None:
    w = ShardedWriter(tmp_path, [TensorSpec("a", torch.bfloat16, (2, 3))])
    with pytest.raises(ValueError, match=r"dtype torch.float32 differs .* torch.bfloat16"):
        w.write("a", torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"shape \(3, 2\) differs .* \(2, 3\)"):
        w.write("a", torch.ones(3, 2, dtype=torch.bfloat16))
    w.write("a", torch.ones(2, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="already written"):
        w.write("b", torch.ones(1))
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write("a", torch.ones(2, 3, dtype=torch.bfloat16))


def test_writer_close_lists_missing_tensors(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(1), "b": torch.ones(1), "c": torch.ones(1)}
    w = ShardedWriter(tmp_path, specs_of(tensors))
    w.write("a", tensors["a"])
    with pytest.raises(ValueError, match=r"2 planned tensors were not written: 'b', 'c'"):
        w.close()
    assert not (tmp_path / "model.safetensors.index.json").exists()
    w.abort()


def test_writer_abort_deletes_everything(tmp_path: Path) -> None:
    out = tmp_path / "out"
    tensors = {f"t{i}": torch.ones(10) for i in range(4)}
    w = ShardedWriter(out, specs_of(tensors), max_shard_bytes=40)
    for name in ["t0", "t1", "t2"]:
        w.write(name, tensors[name])
    w.flush()  # writes happen on a background thread
    assert len(list(out.iterdir())) == 3
    w.abort()
    assert list(out.iterdir()) == []
    with pytest.raises(ValueError, match="aborted"):
        w.write("t3", tensors["t3"])


def test_writer_context_manager_aborts_on_error(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError),
        ShardedWriter(tmp_path, [TensorSpec("a", torch.float32, (2,))]) as w,
    ):
        w.write("a", torch.ones(2))
        raise RuntimeError("merge failed")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_plans(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no tensors"):
        ShardedWriter(tmp_path, [])
    with pytest.raises(ValueError, match="twice"):
        ShardedWriter(tmp_path, [TensorSpec("a", torch.float32, (1,))] * 2)
    with pytest.raises(ValueError, match="complex64"):
        ShardedWriter(tmp_path, [TensorSpec("a", torch.complex64, (1,))])
    not_strings: Any = {"n": 1}
    with pytest.raises(ValueError, match="strings"):
        ShardedWriter(tmp_path, [TensorSpec("a", torch.float32, (1,))], metadata=not_strings)


def test_writer_output_loads_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = tmp_path / "merged"
    w = ShardedWriter(out, specs_of(state), max_shard_bytes=8 * 1024)
    for name, t in state.items():
        w.write(name, t)
    assert len(w.close()) > 2
    config.save_pretrained(out)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for name, t in loaded.state_dict().items():
        assert bit_equal(t, state[name]), name


# -- memory ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_reading_a_large_tensor_allocates_about_one_tensor(tmp_path: Path) -> None:
    nbytes = 64 * 2**20
    path = tmp_path / "model.safetensors"
    save_file({"big": torch.ones(nbytes // 4), "small": torch.ones(4)}, path)
    # Peak RSS (VmHWM) is reset just before the read, so import-time peaks do not hide it.
    script = textwrap.dedent(
        f"""
        import torch
        from workers.tensors import CheckpointReader

        def peak():
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024

        r = CheckpointReader({str(path)!r})
        r.read("small")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = peak()
        t = r.read("big")
        growth = peak() - before
        assert bool((t == 1).all())
        print(growth)
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    if res.returncode != 0 and "clear_refs" in res.stderr:
        pytest.skip(f"cannot reset peak RSS here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr
    growth = int(res.stdout.strip().splitlines()[-1])
    # The tensor's own buffer must be touched; anything near 2x means a hidden copy.
    assert nbytes * 0.9 < growth < 1.5 * nbytes, f"peak RSS grew by {growth} bytes"
