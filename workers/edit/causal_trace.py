"""``layers: auto``: the edited layer chosen by a causal trace (ROME §2, "causal tracing").

For one prompt whose answer is a token t (the first token of the request's target_true,
else the model's own most likely next token):

1. **clean run**: the prompt as is; each layer's MLP output at the subject's last token
   is kept, and p_clean = P(t | prompt) at the prompt's last position;
2. **corrupted runs**: ``samples`` runs in which every subject token's input embedding gets
   Gaussian noise (standard deviation ν = ``noise`` × the std of all the entries of the
   model's input embedding matrix; the draws seeded, the same draws for every layer), and
   p_corrupted = their mean P(t);
3. **restored runs**: for each layer l, the same corrupted runs with layer l's MLP output
   at the subject's last token set back to its clean value; p_restored[l] = their mean
   P(t). The *indirect effect* of that MLP state is IE[l] = p_restored[l] − p_corrupted.

Every run is a row of a batched forward pass. The effects are averaged over the prompts
of the edit (ROME: the one request's prompt; MEMIT: each request's prompt) and the peak is
taken among layers 1 … ⌊depth/2⌋ (:func:`search_range`). Each prompt's trace is cached by
(model revision, prompt, subject, target, samples, noise, seed, version) behind a
``TraceCache``, as covariances are (``workers.edit.covariance``).

ROME's reference (kmeng01/rome, ``causal_trace.py``) takes ν = 3 × the std of the token
embeddings of a sample of subjects; here the sample is the whole embedding matrix, so ν
depends on the model only, not on the request. ROME's figures restore a window of 10 MLP
layers around l; the editing choice here restores the one layer it would edit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

import weightsmith
from workers.edit.architectures import EditModel
from workers.edit.prompts import Batch, Prompt, collate, pad_id, subject_span, target_token_ids
from workers.edit.tracing import log_probs_at
from workers.errors import CancelledError

if TYPE_CHECKING:
    from infra.storage import ObjectStore
    from schemas.edit_recipe import EditRequest

log = logging.getLogger("weightsmith.edit.causal_trace")

TRACE_VERSION = "causal-trace/v1"
ROWS_PER_PASS = 256  # corrupted runs per forward pass

# Prompts traced by this process (forward passes run): evidence for tests and the bench
# that a cached trace was reused rather than recomputed.
TRACED: Counter[str] = Counter()


@dataclass(frozen=True)
class TraceSettings:
    """How a trace corrupts and averages: ``samples`` noise draws per prompt, noise std
    ``noise`` × the embedding matrix's std, the draws seeded with ``seed``."""

    samples: int = 10
    noise: float = 3.0
    seed: int = 0


def search_range(depth: int) -> tuple[int, int]:
    """The layers ``auto`` chooses among, inclusive: 1 … ⌊depth/2⌋ (0 for a 1-layer model).

    The published edit layers all lie in the first half (ROME: GPT-2 XL 17 of 48, GPT-J 5
    of 28, Llama-2-7B 5 of 32; MEMIT's bands end at 17/48, 8/28 and 8/32), where ROME's
    traces put the MLP effect at the subject's last token. Layer 0 is left out: its MLP
    reads the (corrupted) token embedding almost directly, so restoring it mostly undoes
    the corruption of that token rather than locating a recall, and no published edit
    uses it."""
    lo = min(1, depth - 1)
    return lo, max(lo, depth // 2)


@torch.no_grad()
def embedding_noise_std(model: Any) -> float:
    """The std of every entry of the model's input embedding matrix (float64)."""
    return float(model.get_input_embeddings().weight.detach().double().std())


@dataclass(frozen=True)
class TraceKey:
    """What a prompt's trace depends on (with the code's trace version)."""

    model_revision: str
    prompt: str
    subject: str
    target: str  # the request's target_true; "" for the model's own next token
    samples: int
    noise: float
    seed: int
    version: str = TRACE_VERSION

    @property
    def file_stem(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class PromptTrace:
    """One prompt's trace. ``subject_tokens``: (first, last) token index of the subject;
    ``p_restored[l]``: mean P(target) with layer l's MLP output restored."""

    prompt: str
    subject: str
    target: str
    target_token: int
    subject_tokens: tuple[int, int]
    noise_std: float
    p_clean: float
    p_corrupted: float
    p_restored: tuple[float, ...]

    @property
    def indirect_effect(self) -> list[float]:
        return [p - self.p_corrupted for p in self.p_restored]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "subject_tokens": list(self.subject_tokens)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PromptTrace:
        return cls(
            prompt=str(d["prompt"]),
            subject=str(d["subject"]),
            target=str(d["target"]),
            target_token=int(d["target_token"]),
            subject_tokens=(int(d["subject_tokens"][0]), int(d["subject_tokens"][1])),
            noise_std=float(d["noise_std"]),
            p_clean=float(d["p_clean"]),
            p_corrupted=float(d["p_corrupted"]),
            p_restored=tuple(float(x) for x in d["p_restored"]),
        )


def _out_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _with_tensor(out: Any, t: torch.Tensor) -> Any:
    return (t, *out[1:]) if isinstance(out, tuple) else t


def _noise(settings: TraceSettings, n_tokens: int, width: int, std: float) -> torch.Tensor:
    """[samples, n_tokens, width] float32: the seeded draws × std (the same for every
    prompt of a trace with the same settings)."""
    g = torch.Generator().manual_seed(settings.seed)
    return torch.randn(settings.samples, n_tokens, width, generator=g) * std


@torch.no_grad()
def trace_prompt(
    target: EditModel,
    prompt: str,
    subject: str,
    target_true: str | None,
    settings: TraceSettings,
) -> PromptTrace:
    """The trace of one prompt (module docstring), in batched forward passes of at most
    ROWS_PER_PASS rows."""
    model, tokenizer, arch = target.model, target.tokenizer, target.arch
    ids, first, last = subject_span(tokenizer, prompt, subject)
    depth = target.depth
    end = len(ids) - 1  # the position whose logits predict the answer
    mlp = [model.get_submodule(arch.module_name(layer)) for layer in range(depth)]

    # 1. clean run: MLP outputs at the subject's last token, the answer and its probability
    clean: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Any:
        def hook(_m: Any, _args: Any, out: Any) -> None:
            clean[layer] = _out_tensor(out)[0, last].detach().clone()

        return hook

    one = collate([Prompt(ids=ids, subject_pos=last)], pad_id(tokenizer), model.device)
    handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(mlp)]
    try:
        lp = log_probs_at(model, one, one.rows, torch.tensor([end], device=one.device))[0]
    finally:
        for h in handles:
            h.remove()
    if target_true is not None:
        token = target_token_ids(tokenizer, prompt, target_true)[0]
        answer = target_true
    else:
        token = int(lp.argmax())
        answer = str(tokenizer.decode([token])).strip()
    p_clean = float(lp[token].double().exp())

    # 2–3. corrupted rows: restore nothing (-1) or layer l, for each noise draw
    std = embedding_noise_std(model) * settings.noise
    width = model.get_input_embeddings().weight.shape[1]
    noise = _noise(settings, last - first + 1, width, std)
    plan = [(layer, j) for layer in range(-1, depth) for j in range(settings.samples)]
    probs = torch.zeros(len(plan), dtype=torch.float64)
    for start in range(0, len(plan), ROWS_PER_PASS):
        chunk = plan[start : start + ROWS_PER_PASS]
        restore = torch.tensor([layer for layer, _ in chunk], device=one.device)
        # drawn on the CPU (the same noise on every device), used where the model is
        draws = noise[torch.tensor([j for _, j in chunk])].to(one.device)
        batch = Batch(
            one.input_ids.expand(len(chunk), -1),
            one.attention_mask.expand(len(chunk), -1),
            one.prompts * len(chunk),
        )
        probs[start : start + len(chunk)] = _corrupted_probs(
            model, mlp, batch, restore, draws, clean, (first, last, end), token
        )
    TRACED["prompts"] += 1
    TRACED["rows"] += len(plan) + 1
    per = probs.view(depth + 1, settings.samples).mean(1)
    return PromptTrace(
        prompt=prompt,
        subject=subject,
        target=answer,
        target_token=token,
        subject_tokens=(first, last),
        noise_std=std,
        p_clean=p_clean,
        p_corrupted=float(per[0]),
        p_restored=tuple(float(p) for p in per[1:]),
    )


def _corrupted_probs(
    model: Any,
    mlp: list[Any],
    batch: Batch,
    restore: torch.Tensor,
    draws: torch.Tensor,
    clean: dict[int, torch.Tensor],
    positions: tuple[int, int, int],
    token: int,
) -> torch.Tensor:
    """P(token) at position ``end`` for each row: the subject's embeddings + ``draws[row]``,
    and the MLP output of layer ``restore[row]`` (none for -1) at the subject's last token
    set to its clean value."""
    first, last, end = positions

    def corrupt(_m: Any, _args: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, first : last + 1] += draws.to(out.device, out.dtype)
        return out

    def restorer(layer: int) -> Any:
        rows = (restore == layer).nonzero()[:, 0]

        def hook(_m: Any, _args: Any, out: Any) -> Any:
            if len(rows) == 0:
                return None
            h = _out_tensor(out).clone()
            h[rows, last] = clean[layer].to(h.dtype)
            return _with_tensor(out, h)

        return hook

    handles = [model.get_input_embeddings().register_forward_hook(corrupt)]
    handles += [m.register_forward_hook(restorer(i)) for i, m in enumerate(mlp)]
    try:
        n = len(restore)
        rows = torch.arange(n, device=batch.device)
        lp = log_probs_at(model, batch, rows, torch.full_like(rows, end))
    finally:
        for h in handles:
            h.remove()
    return lp[:, token].double().exp().cpu()


# ---- the cache -------------------------------------------------------------------------------


class TraceCache(Protocol):
    """Where prompt traces are kept and found again (JSON documents)."""

    def get(self, key: TraceKey) -> dict[str, Any] | None: ...

    def put(self, key: TraceKey, record: dict[str, Any]) -> None: ...


class LocalTraceCache:
    """One JSON file per key under ``root`` (the key is stored in it and checked)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()

    def _path(self, key: TraceKey) -> Path:
        return self.root / f"{key.file_stem}.json"

    def get(self, key: TraceKey) -> dict[str, Any] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except ValueError:
            return None
        return record if isinstance(record, dict) and record.get("key") == asdict(key) else None

    def put(self, key: TraceKey, record: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".trace-", dir=self.root)
        with os.fdopen(fd, "w") as f:
            json.dump({"key": asdict(key), **record}, f, sort_keys=True)
        os.replace(tmp, self._path(key))


class ObjectStoreTraceCache:
    """Traces in an object store, one JSON object per key (``{prefix}/{stem}.json``),
    created with a conditional put (the first writer wins; both computed the same trace).
    An unreadable or foreign entry is a miss; failing to write is logged, not fatal.
    ``prefix`` starts with ``_`` so that it cannot be a tenant's folder."""

    def __init__(self, store: ObjectStore, prefix: str = "_cache/trace") -> None:
        self.store = store
        self.prefix = prefix.strip("/")

    def _key(self, key: TraceKey) -> str:
        return f"{self.prefix}/{key.file_stem}.json"

    def get(self, key: TraceKey) -> dict[str, Any] | None:
        from infra.storage import ObjectNotFound, StorageError

        try:
            record = json.loads(self.store.get_bytes(self._key(key)))
        except ObjectNotFound:
            return None
        except (ValueError, StorageError) as e:
            log.warning("trace cache %s: unreadable (%s); recomputing", self._key(key), e)
            return None
        return record if isinstance(record, dict) and record.get("key") == asdict(key) else None

    def put(self, key: TraceKey, record: dict[str, Any]) -> None:
        from infra.storage import ObjectExists, StorageError

        body = json.dumps({"key": asdict(key), **record}, sort_keys=True).encode()
        try:
            self.store.put_bytes(self._key(key), body, if_absent=True)
        except ObjectExists:
            pass
        except StorageError as e:
            log.warning("trace cache %s: not stored (%s)", self._key(key), e)


def default_trace_cache_dir() -> Path:
    env = os.environ.get("WEIGHTSMITH_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "weightsmith"
    return root / "trace"


# ---- choosing the layers ---------------------------------------------------------------------


@dataclass(frozen=True)
class LayerChoice:
    """The trace of an edit and the layers chosen from it."""

    layers: list[int]
    peak: int
    search_range: tuple[int, int]
    effects: list[float]  # mean indirect effect per layer (0 … depth−1)
    traces: list[PromptTrace]
    settings: TraceSettings
    cache: list[str] = field(default_factory=list)  # "hit" / "miss" per prompt

    def record(self) -> dict[str, Any]:
        """For the metrics and the manifest."""
        return {
            "layers": list(self.layers),
            "peak": self.peak,
            "search_range": list(self.search_range),
            "indirect_effect": [round(x, 6) for x in self.effects],
            "samples": self.settings.samples,
            "noise": self.settings.noise,
            "seed": self.settings.seed,
            "version": TRACE_VERSION,
            "prompts": [
                {
                    "prompt": t.prompt,
                    "subject": t.subject,
                    "target": t.target,
                    "subject_tokens": list(t.subject_tokens),
                    "noise_std": round(t.noise_std, 6),
                    "p_clean": round(t.p_clean, 6),
                    "p_corrupted": round(t.p_corrupted, 6),
                    "indirect_effect": [round(x, 6) for x in t.indirect_effect],
                    "cache": c,
                }
                for t, c in zip(self.traces, self.cache, strict=True)
            ],
        }


def peak_layer(effects: Sequence[float], depth: int) -> int:
    """The layer with the largest effect in :func:`search_range` (the lowest on a tie)."""
    lo, hi = search_range(depth)
    return max(range(lo, hi + 1), key=lambda layer: (effects[layer], -layer))


def traces(
    target: EditModel,
    requests: Sequence[EditRequest],
    settings: TraceSettings,
    *,
    model_revision: str,
    cache: TraceCache | None,
    cancelled: Callable[[], bool] | None = None,
) -> tuple[list[PromptTrace], list[str]]:
    """Each request prompt's trace, from the cache where present (``"hit"``), computed and
    cached otherwise (``"miss"``). ``cancelled`` is checked before each computed trace."""
    out, how = [], []
    for r in requests:
        key = TraceKey(
            model_revision,
            r.prompt,
            r.subject,
            r.target_true or "",
            settings.samples,
            settings.noise,
            settings.seed,
        )
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            try:
                out.append(PromptTrace.from_json(hit["trace"]))
                how.append("hit")
                continue
            except (KeyError, TypeError, ValueError, IndexError):
                log.warning("trace cache: malformed entry for %r; recomputing", r.prompt)
        if cancelled is not None and cancelled():
            raise CancelledError("the job was cancelled")
        started = time.perf_counter()
        t = trace_prompt(target, r.prompt, r.subject, r.target_true, settings)
        if cache is not None:
            cache.put(
                key,
                {
                    "trace": t.to_json(),
                    "seconds": round(time.perf_counter() - started, 3),
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "code_version": weightsmith.__version__,
                },
            )
        out.append(t)
        how.append("miss")
    return out, how


def choose_layers(
    target: EditModel,
    requests: Sequence[EditRequest],
    settings: TraceSettings,
    band: Callable[[int, int], list[int]],
    *,
    model_revision: str,
    cache: TraceCache | None,
    cancelled: Callable[[], bool] | None = None,
) -> LayerChoice:
    """Trace the requests' prompts, average the indirect effects per layer, and take the
    layers ``band(peak, depth)`` of the peak within :func:`search_range`."""
    depth = target.depth
    found, how = traces(
        target, requests, settings, model_revision=model_revision, cache=cache, cancelled=cancelled
    )
    effects = [sum(t.indirect_effect[layer] for t in found) / len(found) for layer in range(depth)]
    peak = peak_layer(effects, depth)
    return LayerChoice(
        layers=band(peak, depth),
        peak=peak,
        search_range=search_range(depth),
        effects=effects,
        traces=found,
        settings=settings,
        cache=how,
    )
