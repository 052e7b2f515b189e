"""An edited model's edit history: the requests of every edit that produced it and, per edited
layer, the keys those edits wrote (``edit/history.safetensors`` beside the weights).

AlphaEdit protects earlier edits by keeping the outputs of their keys Kₚ (Fang et al. 2025,
eq. 14); the history carries them from one artifact to the next, so a user editing an edited
model does not list them. Every edit method records its requests and keys, so a later
AlphaEdit also protects ROME and MEMIT edits.

On disk (safetensors): per layer L, ``layer{L}.keys`` ([d_in, n] float32, one column per
request edited at L) and ``layer{L}.requests`` ([n] int64, each column's request: its
position in the history's requests, over all edits in order); the metadata holds the format
and the edits (method, layers, requests) as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from workers.errors import InputError

if TYPE_CHECKING:
    from schemas.edit_recipe import EditRequest
    from workers.edit.architectures import EditModel
    from workers.edit.update import RankOneUpdate

HISTORY = "edit/history.safetensors"  # relative to the model folder
HISTORY_FORMAT = "weightsmith.edit_history/1"


@dataclass(frozen=True)
class EditHistory:
    """The edits so far, in order: ``edits`` (method, layers, requests as recipe JSON) and,
    per layer, the keys written there (``keys[L]`` [d_in, n]) and whose they are
    (``owners[L]`` [n], positions in :attr:`requests`)."""

    edits: list[dict[str, Any]] = field(default_factory=list)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    owners: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> EditHistory:
        return cls()

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every earlier request (recipe JSON), over all edits in order."""
        return [r for e in self.edits for r in e["requests"]]

    def missing(self, layer: int) -> list[int]:
        """The earlier requests with no key recorded at ``layer`` (edited at other layers)."""
        have = set(self.owners[layer].tolist()) if layer in self.owners else set()
        return [i for i in range(len(self.requests)) if i not in have]

    def extended(
        self, method: str, requests: Sequence[EditRequest], updates: Sequence[RankOneUpdate]
    ) -> EditHistory:
        """This history plus one edit: its requests and the key each update wrote."""
        base = len(self.requests)
        keys = {layer: [k] for layer, k in self.keys.items()}
        owners = {layer: [o] for layer, o in self.owners.items()}
        for u in updates:
            if u.key is None:
                raise ValueError(f"{method}: update of request {u.request} has no key")
            k = u.key.detach().float().cpu().reshape(-1, 1)
            keys.setdefault(u.layer, []).append(k)
            owners.setdefault(u.layer, []).append(torch.tensor([base + u.request]))
        edit = {
            "method": method,
            "layers": sorted({u.layer for u in updates}),
            "requests": [r.model_dump(mode="json", exclude_defaults=True) for r in requests],
        }
        return EditHistory(
            [*self.edits, edit],
            {layer: torch.cat(ks, dim=1) for layer, ks in keys.items()},
            {layer: torch.cat(os_) for layer, os_ in owners.items()},
        )

    def check(self, target: EditModel, *, model: str | None = None) -> None:
        """InputError naming the file when the history's keys cannot be this model's: a
        layer it does not have, or keys of another width than the layer's."""
        for layer, k in sorted(self.keys.items()):
            if layer >= target.depth:
                raise InputError(
                    f"the history has keys at layer {layer}; the model has {target.depth} "
                    "layers: the history belongs to another model",
                    model=model,
                    file=HISTORY,
                )
            width = target.key_width(layer)
            if k.shape[0] != width:
                raise InputError(
                    f"the history's keys at layer {layer} are {k.shape[0]}-wide, the model's "
                    f"{width}: the history belongs to another model",
                    model=model,
                    file=HISTORY,
                )

    def summary(self) -> dict[str, Any]:
        """What the manifest records: the file, the edits and their requests."""
        return {"file": HISTORY, "edits": self.edits}

    def write(self, folder: Path) -> None:
        """``folder/edit/history.safetensors``."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for layer in sorted(self.keys):
            tensors[f"layer{layer}.keys"] = self.keys[layer].contiguous()
            tensors[f"layer{layer}.requests"] = self.owners[layer].to(torch.int64).contiguous()
        path = folder / HISTORY
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            tensors,
            str(path),
            metadata={"format": HISTORY_FORMAT, "edits": json.dumps(self.edits)},
        )


def read_history(folder: Path, *, model: str) -> EditHistory:
    """The history of the model in ``folder`` (empty when it has none: an unedited model).
    InputError naming the model and the file when the file is not a history this code
    wrote (unreadable, another format, inconsistent keys or requests)."""
    path = folder / HISTORY
    if not path.is_file():
        return EditHistory.empty()

    def bad(why: str) -> InputError:
        return InputError(
            f"not a valid edit history ({why}); an edited model's {HISTORY} is written by "
            "weightsmith's edits: remove the file to edit the model without its history",
            model=model,
            file=HISTORY,
        )

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise bad(f"unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if metadata.get("format") != HISTORY_FORMAT:
        raise bad(f"format {metadata.get('format')!r}, expected {HISTORY_FORMAT!r}")
    edits = _edits(metadata.get("edits"), bad)
    n = sum(len(e["requests"]) for e in edits)
    keys: dict[int, torch.Tensor] = {}
    owners: dict[int, torch.Tensor] = {}
    for name, t in tensors.items():
        layer, kind = _tensor_name(name, bad)
        (keys if kind == "keys" else owners)[layer] = t
    if set(keys) != set(owners):
        raise bad("each layer needs both layer{L}.keys and layer{L}.requests")
    for layer in keys:
        k, o = keys[layer], owners[layer]
        if k.dim() != 2 or k.dtype != torch.float32 or not bool(torch.isfinite(k).all()):
            raise bad(f"layer{layer}.keys must be finite float32 [d_in, n]")
        if o.dim() != 1 or o.dtype != torch.int64 or o.shape[0] != k.shape[1]:
            raise bad(f"layer{layer}.requests must be int64 [n] with n = keys' columns")
        if o.numel() and (int(o.min()) < 0 or int(o.max()) >= n):
            raise bad(f"layer{layer}.requests names requests outside 0–{n - 1}")
    return EditHistory(edits, keys, owners)


def _edits(raw: str | None, bad: Any) -> list[dict[str, Any]]:
    from pydantic import ValidationError

    from schemas.edit_recipe import EditRequest

    try:
        edits = json.loads(raw or "")
    except json.JSONDecodeError as e:
        raise bad(f"its 'edits' metadata is not JSON: {e}") from e
    if not isinstance(edits, list):
        raise bad("its 'edits' metadata is not a list")
    for i, entry in enumerate(edits):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("method"), str)
            and isinstance(entry.get("requests"), list)
        ):
            raise bad(f"edits[{i}] needs a method and a list of requests")
        for j, r in enumerate(entry["requests"]):
            try:
                EditRequest.model_validate(r)
            except ValidationError as err:
                raise bad(f"edits[{i}].requests[{j}] is not an edit request: {err}") from err
    return edits


def _tensor_name(name: str, bad: Any) -> tuple[int, str]:
    head, _, kind = name.partition(".")
    number = head.removeprefix("layer")
    if not head.startswith("layer") or not number.isdigit() or kind not in ("keys", "requests"):
        raise bad(f"unexpected tensor {name!r} (layer{{L}}.keys, layer{{L}}.requests)")
    return int(number), kind


def earlier_requests(history: EditHistory, indices: Sequence[int]) -> list[EditRequest]:
    """The history's requests at ``indices`` as EditRequest objects."""
    from schemas.edit_recipe import EditRequest

    requests = history.requests
    return [EditRequest.model_validate(requests[i]) for i in indices]
