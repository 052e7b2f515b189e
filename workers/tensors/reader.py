"""Lazy, validated, one-tensor-at-a-time reading of a checkpoint.

Merges stream tensor by tensor so that peak memory stays near one tensor per model. The
reader therefore never maps or loads a whole safetensors file: headers are parsed (and
checked) at open time, and ``read`` allocates exactly one tensor's buffer and fills it with
``readinto``. Pickle checkpoints (``pytorch_model*.bin``, ``*.pt``, ``*.pth``) can execute
code when loaded, so they are refused unless the recipe sets ``allow_pickle: true``; even
then they go through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import difflib
import io
import json
import math
import os
import re
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import torch

from workers.errors import CheckpointError
from workers.tensors.safetensors_format import DTYPES, TensorInfo, dtype_code, read_header

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SHARDS = "pytorch_model-*.bin"
LOOKED_FOR = (
    SAFE_SINGLE,
    SAFE_INDEX,
    "*.safetensors",
    PICKLE_SINGLE,
    PICKLE_INDEX,
    PICKLE_SHARDS,
    "*.pt",
    "*.pth",
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class CheckpointReader:
    """Reads one tensor at a time from a checkpoint: a directory with model.safetensors,
    or a sharded directory with model.safetensors.index.json, or a single .safetensors file.
    Never mmaps or loads a whole file: each read() allocates exactly one tensor's buffer
    and fills it with readinto (so peak memory is one tensor).

    Directory lookup order (first match wins): ``model.safetensors``,
    ``model.safetensors.index.json``, a single other ``*.safetensors.index.json``, every
    ``*.safetensors`` file; then, for pickle checkpoints, ``pytorch_model.bin``,
    ``pytorch_model.bin.index.json``, ``pytorch_model-*.bin``, every ``*.pt``/``*.pth``.
    A path may also name one ``.safetensors``, ``.bin``, ``.pt``, ``.pth`` or index file.
    """

    def __init__(
        self, path: Path | str, *, label: str | None = None, allow_pickle: bool = False
    ) -> None:
        self.path = Path(path).expanduser()
        self.label: str = label if label is not None else str(path)
        self.allow_pickle = allow_pickle
        self.metadata: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._files: list[Path] = []
        self._handles: dict[Path, io.FileIO] = {}
        self._lock = threading.Lock()
        self._pickle = False
        # The one pickle file whose state dict is currently loaded (mmapped when possible).
        self._loaded: tuple[Path, dict[str, torch.Tensor]] | None = None
        self._closed = False

        kind, index, files = self._locate()
        if kind == "pickle":
            self._pickle = True
            if not allow_pickle:
                shown = index if index is not None else files[0]
                raise self._error(
                    f"found only a pickle checkpoint ({shown.name}); pickle checkpoints are "
                    "refused because loading them can execute arbitrary code. Convert it to "
                    "safetensors, or set `allow_pickle: true` in the recipe to load it with "
                    "torch.load(weights_only=True), which refuses anything but tensors",
                    file=shown.name,
                )
            self._open_pickle(index, files)
        else:
            self._open_safetensors(index, files)
        self.names: list[str] = sorted(self._infos)

    # -- public API ----------------------------------------------------------------------

    def info(self, name: str) -> TensorInfo:
        """Where a tensor is and what it is; CheckpointError (with close matches) if absent."""
        try:
            return self._infos[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._infos, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise self._error(
                f"tensor not found in the checkpoint ({len(self._infos)} tensors){hint}",
                tensor=name,
            ) from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._infos

    def read(self, name: str) -> torch.Tensor:
        """The tensor with its stored dtype and shape, on the CPU, owning its memory."""
        if self._closed:
            raise ValueError(f"reader for {self.label!r} is closed")
        info = self.info(name)
        if self._pickle:
            return self._read_pickle(info)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            view = buf.numpy().data  # a writable memoryview of the tensor's buffer
            got = 0
            try:
                with self._lock:
                    f = self._handle(info.file)
                    f.seek(info.start)
                    while got < info.nbytes:
                        n = f.readinto(view[got:])
                        if not n:
                            break
                        got += n
            except OSError as e:
                raise self._error(
                    f"cannot read the tensor: {e.strerror or e}", file=info.file.name, tensor=name
                ) from e
            finally:
                view.release()
            if got < info.nbytes:
                raise self._error(
                    f"file is truncated: tensor {name!r} ends at byte {info.end} but only "
                    f"{info.start + got} bytes could be read (the file changed after the "
                    "checkpoint was opened)",
                    file=info.file.name,
                    tensor=name,
                )
        return buf.view(info.torch_dtype).reshape(info.shape)

    def read_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Elements [start, start + out.numel()) of the flattened tensor, read into ``out``
        (contiguous, the tensor's dtype) and returned.

        Reads only those bytes (one ``preadv``, no seek and no lock), so a large tensor can
        be streamed block by block into a few reused buffers.
        """
        if self._closed:
            raise ValueError(f"reader for {self.label!r} is closed")
        info = self.info(name)
        count = out.numel()
        if out.dtype != info.torch_dtype or not out.is_contiguous():
            raise ValueError(f"read_into needs a contiguous {info.torch_dtype} buffer")
        if start < 0 or start + count > info.numel:
            raise ValueError(
                f"elements [{start}, {start + count}) are outside tensor {name!r} of "
                f"{info.numel} elements"
            )
        if count == 0:
            return out
        if self._pickle:
            out.view(-1).copy_(
                self._read_pickle(info, copy=False).reshape(-1)[start : start + count]
            )
            return out
        size = out.element_size()
        offset, nbytes = info.start + start * size, count * size
        view = out.view(-1).view(torch.uint8).numpy().data
        got = 0
        try:
            with self._lock:
                fd = self._handle(info.file).fileno()
            while got < nbytes:
                n = os.preadv(fd, [view[got:]], offset + got)
                if not n:
                    break
                got += n
        except OSError as e:
            raise self._error(
                f"cannot read the tensor: {e.strerror or e}", file=info.file.name, tensor=name
            ) from e
        finally:
            view.release()
        if got < nbytes:
            raise self._error(
                f"file is truncated: tensor {name!r} ends at byte {info.end} but only "
                f"{offset + got} bytes could be read (the file changed after the checkpoint "
                "was opened)",
                file=info.file.name,
                tensor=name,
            )
        return out

    def files(self) -> list[Path]:
        """The files the tensors come from (shards in index order)."""
        return list(self._files)

    def total_bytes(self) -> int:
        """Sum of all tensors' sizes in bytes, as stored."""
        return sum(info.nbytes for info in self._infos.values())

    def close(self) -> None:
        """Close every open file handle and drop any loaded pickle state dict."""
        self._closed = True
        self._loaded = None
        with self._lock:
            handles, self._handles = self._handles, {}
        for f in handles.values():
            f.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({self.label!r}, {len(self._infos)} tensors)"

    # -- locating ------------------------------------------------------------------------

    def _error(
        self, message: str, *, file: str | None = None, tensor: str | None = None
    ) -> CheckpointError:
        return CheckpointError(message, model=self.label, file=file, tensor=tensor)

    def _locate(self) -> tuple[str, Path | None, list[Path]]:
        """(kind, index file or None, data files) for the path; kind is safetensors|pickle."""
        p = self.path
        if not p.exists():
            raise self._error(
                f"no checkpoint found: {p} does not exist (expected a directory containing "
                f"one of {', '.join(LOOKED_FOR)}, or a .safetensors file)"
            )
        if p.is_file():
            name = p.name
            if name.endswith(".safetensors"):
                return "safetensors", None, [p]
            if name.endswith(".safetensors.index.json"):
                return "safetensors", p, []
            if name.endswith(".bin.index.json"):
                return "pickle", p, []
            if p.suffix in _PICKLE_SUFFIXES:
                return "pickle", None, [p]
            raise self._error(
                f"{p} is not a checkpoint file: expected a .safetensors file, an index "
                "(.safetensors.index.json) or a directory holding them",
                file=name,
            )

        if (p / SAFE_SINGLE).is_file():
            return "safetensors", None, [p / SAFE_SINGLE]
        if (p / SAFE_INDEX).is_file():
            return "safetensors", p / SAFE_INDEX, []
        indexes = sorted(x for x in p.glob("*.safetensors.index.json") if x.is_file())
        if len(indexes) == 1:
            return "safetensors", indexes[0], []
        shards = sorted(x for x in p.glob("*.safetensors") if x.is_file())
        if shards:
            return "safetensors", None, shards

        if (p / PICKLE_SINGLE).is_file():
            return "pickle", None, [p / PICKLE_SINGLE]
        if (p / PICKLE_INDEX).is_file():
            return "pickle", p / PICKLE_INDEX, []
        bins = sorted(x for x in p.glob(PICKLE_SHARDS) if x.is_file())
        if bins:
            return "pickle", None, bins
        pts = sorted(x for x in [*p.glob("*.pt"), *p.glob("*.pth")] if x.is_file())
        if pts:
            return "pickle", None, pts
        raise self._error(
            f"no checkpoint found in directory {p}: looked for {', '.join(LOOKED_FOR)}"
        )

    def _read_index(self, index: Path) -> dict[str, Path]:
        """weight_map of an index file, as tensor name -> shard path (checked to exist)."""
        fname = index.name
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except OSError as e:
            raise self._error(f"cannot read the index: {e.strerror or e}", file=fname) from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._error(f"index is not valid JSON: {e}", file=fname) from None
        if not isinstance(data, dict) or "weight_map" not in data:
            raise self._error(
                'index has no "weight_map": expected {"weight_map": {"<tensor>": "<shard file>"}}',
                file=fname,
            )
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise self._error(
                '"weight_map" must map tensor names to shard file names (strings)', file=fname
            )
        out: dict[str, Path] = {}
        checked: dict[str, Path] = {}
        for name, shard in weight_map.items():
            path = checked.get(shard)
            if path is None:
                path = index.parent / shard
                # Checked lexically, not resolved: Hub cache snapshots are symlinks to blobs
                # that live outside the snapshot directory.
                if not shard or Path(shard).is_absolute() or ".." in Path(shard).parts:
                    raise self._error(
                        f"index points tensor {name!r} to {shard!r}, which is outside the "
                        "checkpoint directory",
                        file=fname,
                        tensor=name,
                    )
                if not path.is_file():
                    raise self._error(
                        f"shard {shard!r} listed in {fname} (e.g. for tensor {name!r}) does not "
                        f"exist in {index.parent}: the download is incomplete",
                        file=shard,
                        tensor=name,
                    )
                checked[shard] = path
            out[name] = path
        return out

    # -- safetensors ---------------------------------------------------------------------

    def _open_safetensors(self, index: Path | None, files: list[Path]) -> None:
        weight_map = self._read_index(index) if index is not None else None
        if weight_map is not None:
            files = sorted(set(weight_map.values()), key=lambda x: x.name)
        per_file: dict[Path, dict[str, TensorInfo]] = {}
        seen: dict[str, Path] = {}
        for file in files:
            infos, metadata = read_header(file, self.label)
            if not per_file:
                self.metadata = metadata
            per_file[file] = {}
            for info in infos:
                other = seen.get(info.name)
                if other is not None:
                    raise self._error(
                        f"tensor {info.name!r} is stored in both {other.name} and {file.name}: "
                        "the checkpoint is ambiguous",
                        file=file.name,
                        tensor=info.name,
                    )
                seen[info.name] = file
                per_file[file][info.name] = info
        self._files = list(files)
        if weight_map is None:
            for tensors in per_file.values():
                self._infos.update(tensors)
            return
        assert index is not None
        for name, file in weight_map.items():
            found = per_file[file].get(name)
            if found is None:
                raise self._error(
                    f"{index.name} lists tensor {name!r} in {file.name}, but that shard does "
                    "not contain it: the index and the shards do not match",
                    file=file.name,
                    tensor=name,
                )
            self._infos[name] = found

    def _handle(self, file: Path) -> io.FileIO:
        f = self._handles.get(file)
        if f is None:
            # Unbuffered: readinto goes straight into the tensor's buffer.
            f = io.FileIO(file, "rb")
            self._handles[file] = f
        return f

    # -- pickle --------------------------------------------------------------------------

    def _open_pickle(self, index: Path | None, files: list[Path]) -> None:
        weight_map = self._read_index(index) if index is not None else None
        if weight_map is not None:
            files = sorted(set(weight_map.values()), key=lambda x: x.name)
        seen: dict[str, Path] = {}
        per_file: dict[Path, set[str]] = {}
        for file in files:
            # Loading (mmapped) is the only way to list a pickle's tensors; one at a time.
            self._loaded = (file, self._torch_load(file))
            per_file[file] = set(self._loaded[1])
            for name, shape_dtype in self._pickle_shapes(self._loaded[1]).items():
                other = seen.get(name)
                if other is not None:
                    raise self._error(
                        f"tensor {name!r} is stored in both {other.name} and {file.name}: "
                        "the checkpoint is ambiguous",
                        file=file.name,
                        tensor=name,
                    )
                seen[name] = file
                shape, dtype = shape_dtype
                nbytes = math.prod(shape) * dtype.itemsize
                self._infos[name] = TensorInfo(name, dtype_code(dtype), shape, file, 0, nbytes)
        self._files = list(files)
        if weight_map is not None:
            assert index is not None
            for name, file in weight_map.items():
                if name not in per_file[file]:
                    raise self._error(
                        f"{index.name} lists tensor {name!r} in {file.name}, but that shard "
                        "does not contain it: the index and the shards do not match",
                        file=file.name,
                        tensor=name,
                    )
            # The index is authoritative: tensors it does not list are not part of the model.
            self._infos = {name: self._infos[name] for name in weight_map}

    @staticmethod
    def _pickle_shapes(
        state: dict[str, torch.Tensor],
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {name: (tuple(t.shape), t.dtype) for name, t in state.items()}

    def _torch_load(self, file: Path) -> dict[str, torch.Tensor]:
        """torch.load(weights_only=True) one pickle file, checked to be a flat state dict."""
        self._loaded = None  # drop the previous file before loading the next
        try:
            # mmap needs the zip format of torch.save; older files are read into memory.
            obj = torch.load(
                file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file)
            )
        except Exception as e:
            raise self._error(
                "torch.load(weights_only=True) could not load this pickle checkpoint: "
                f"{_load_failure_reason(e)}. Only plain tensors are accepted; convert the "
                "checkpoint to safetensors with a trusted tool",
                file=file.name,
            ) from e
        if not isinstance(obj, Mapping):
            raise self._error(
                f"expected a state dict (tensor name -> tensor), got a {type(obj).__name__}",
                file=file.name,
            )
        state: dict[str, torch.Tensor] = {}
        for name, value in obj.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                raise self._error(
                    "expected a flat state dict (tensor name -> tensor), but entry "
                    f"{name!r} is a {type(value).__name__}",
                    file=file.name,
                    tensor=str(name),
                )
            if value.layout != torch.strided or value.dtype not in DTYPES.values():
                raise self._error(
                    f"unsupported tensor: dtype {value.dtype}, layout {value.layout}; only "
                    "dense tensors of these dtypes are supported: "
                    + ", ".join(str(d) for d in DTYPES.values()),
                    file=file.name,
                    tensor=name,
                )
            state[name] = value
        return state

    def _read_pickle(self, info: TensorInfo, *, copy: bool = True) -> torch.Tensor:
        with self._lock:
            if self._loaded is None or self._loaded[0] != info.file:
                self._loaded = (info.file, self._torch_load(info.file))
            tensor = self._loaded[1][info.name]
        if not copy:
            return tensor.detach()
        return tensor.detach().clone(memory_format=torch.contiguous_format)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_GLOBAL = re.compile(r"([Uu]nsupported (?:global|GLOBAL)[^\n]*?)(?:\.\s|\.?$)", re.MULTILINE)


def _load_failure_reason(e: BaseException) -> str:
    """The useful line of a torch.load error (its text is mostly advice for developers)."""
    text = _ANSI.sub("", str(e))
    m = _GLOBAL.search(text)
    if m:
        return m.group(1).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return first[:300]
