"""The safetensors file layout: dtype codes, header parsing with validation, header encoding.

A safetensors file is ``<u64 little-endian header length N><N bytes of JSON header><data>``.
The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` with
offsets relative to the start of the data, plus an optional ``"__metadata__"`` object of
strings. Everything a checkpoint can get wrong is checked here once, at open time, so that
reading a tensor later is a plain ``seek`` + ``readinto`` and every failure names the file
and the tensor.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.errors import CheckpointError

# Same limit as the safetensors library: a header this large is corrupt, not a checkpoint.
MAX_HEADER_BYTES = 100_000_000
# Writers pad the header with spaces so that the data starts at a multiple of this.
HEADER_ALIGNMENT = 8
METADATA_KEY = "__metadata__"

# safetensors dtype code -> torch dtype, in the order error messages list them.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (
    ("U64", "uint64"),
    ("U32", "uint32"),
    ("U16", "uint16"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
):
    if hasattr(torch, _attr):
        DTYPES[_code] = getattr(torch, _attr)

# Builds the CheckpointError for one file: fail(message, tensor_name_or_None).
_Fail = Callable[..., CheckpointError]

_CODES: dict[torch.dtype, str] = {dt: code for code, dt in DTYPES.items()}


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype; ValueError names the supported ones."""
    try:
        return _CODES[dtype]
    except KeyError:
        supported = ", ".join(str(d) for d in _CODES)
        raise ValueError(
            f"dtype {dtype} cannot be stored in safetensors; supported: {supported}"
        ) from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known without reading its bytes.

    ``start``/``end`` are absolute byte offsets in ``file``. For tensors of a pickle
    checkpoint (``allow_pickle``) the bytes are not addressable: ``start`` is 0 and ``end``
    is ``nbytes``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _DuplicateKeyError(ValueError):
    pass


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of two equal keys; a header that names a tensor
    # twice is ambiguous, so refuse it.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def read_header(path: Path, label: str) -> tuple[list[TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: the tensors in file order, and the metadata.

    Raises CheckpointError (model=label, file=path.name) for anything that would make a
    later read wrong: a short file, a bad header length, non-JSON, a malformed entry, an
    unknown dtype, a byte range that disagrees with dtype×shape, a truncated file,
    overlapping tensors.
    """
    fname = path.name

    def fail(message: str, tensor: str | None = None) -> CheckpointError:
        return CheckpointError(message, model=label, file=fname, tensor=tensor)

    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise fail(
                    f"not a safetensors file: it has {size} bytes, fewer than the 8-byte "
                    "header length that starts every safetensors file"
                )
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 8 + header_len > size:
                raise fail(
                    f"header length {header_len} bytes runs past the end of the file "
                    f"({size} bytes): the file is truncated or not a safetensors file"
                )
            if header_len > MAX_HEADER_BYTES:
                raise fail(
                    f"header length {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte "
                    "limit: the file is corrupt or not a safetensors file"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise fail(f"cannot read the file: {e.strerror or e}") from e
    if len(raw) != header_len:
        raise fail(f"file is truncated: could read only {len(raw)} of {header_len} header bytes")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(
            f"header is not valid UTF-8 (bad byte at header offset {e.start}): the file is "
            "corrupt or not a safetensors file"
        ) from None
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKeyError as e:
        raise fail(f"header lists the key {e.args[0]!r} twice", tensor=e.args[0]) from None
    except json.JSONDecodeError as e:
        raise fail(
            f"header is not valid JSON ({e.msg} at character {e.pos}): the file is corrupt "
            "or not a safetensors file"
        ) from None
    if not isinstance(header, dict):
        raise fail(f"header must be a JSON object, got a JSON {type(header).__name__}")

    metadata = header.pop(METADATA_KEY, None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail(f'"{METADATA_KEY}" must be a JSON object whose values are strings')

    data_start = 8 + header_len
    infos: list[TensorInfo] = []
    for name, entry in header.items():
        infos.append(_parse_entry(path, name, entry, data_start, size, fail))
    _check_overlaps(infos, fail)
    return infos, dict(metadata)


def _parse_entry(
    path: Path, name: str, entry: Any, data_start: int, size: int, fail: _Fail
) -> TensorInfo:
    if not isinstance(entry, dict):
        raise fail(
            "header entry must be an object with dtype, shape and data_offsets, got "
            f"{json.dumps(entry)[:80]}",
            name,
        )
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise fail(
            f"header entry is missing {', '.join(missing)}; every tensor needs dtype, shape "
            "and data_offsets",
            name,
        )
    dtype = entry["dtype"]
    if dtype not in DTYPES:
        raise fail(f"unknown dtype {dtype!r}; valid dtypes: {', '.join(DTYPES)}", name)
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise fail(f"shape must be a list of integers, got {json.dumps(shape)[:80]}", name)
    if any(d < 0 for d in shape):
        raise fail(f"shape {shape} has a negative dimension", name)
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise fail(
            f"data_offsets must be [begin, end] integers, got {json.dumps(offsets)[:80]}", name
        )
    begin, end = offsets
    if begin < 0 or end < begin:
        raise fail(f"data_offsets [{begin}, {end}] are invalid: need 0 <= begin <= end", name)
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise fail(
            f"data_offsets [{begin}, {end}] span {end - begin} bytes but dtype {dtype} with "
            f"shape {shape} needs {expected} bytes",
            name,
        )
    abs_start, abs_end = data_start + begin, data_start + end
    if abs_end > size:
        raise fail(
            f"file is truncated: tensor {name!r} ends at byte {abs_end} but the file has "
            f"{size} bytes",
            name,
        )
    return TensorInfo(name, dtype, tuple(shape), path, abs_start, abs_end)


def _check_overlaps(infos: list[TensorInfo], fail: _Fail) -> None:
    # Zero-size tensors own no bytes, so they cannot overlap anything.
    spans = sorted((i for i in infos if i.nbytes), key=lambda i: (i.start, i.end))
    for prev, cur in itertools.pairwise(spans):
        if cur.start < prev.end:
            raise fail(
                f"tensor {cur.name!r} (bytes {cur.start}-{cur.end}) overlaps tensor "
                f"{prev.name!r} (bytes {prev.start}-{prev.end}): the header is corrupt",
                cur.name,
            )


def encode_header(
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> bytes:
    """The length prefix and JSON header for tensors stored back to back in ``entries`` order.

    Padded with spaces so that the data starts at a multiple of 8 bytes, like the
    safetensors library does (keeps every tensor aligned for mmap readers).
    """
    header: dict[str, Any] = {METADATA_KEY: dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        if name == METADATA_KEY:
            raise ValueError(f"{METADATA_KEY!r} is reserved and cannot be a tensor name")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": dtype_code(dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-(8 + len(body)) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(body)) + body
