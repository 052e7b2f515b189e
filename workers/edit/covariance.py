"""C = (1/N) Σ aᵀa: the uncentred second moment of an edited module's input a over every
non-padding token of a corpus (ROME §3.1 "mom2", MEMIT eq. 14), accumulated in float32 with
the forward pass stopped after the last traced layer.

The corpus is a recipe choice (no download at run time): text the user supplies, or text
sampled from the model itself with a seed. Each C is cached by (model revision, layer,
corpus hash, token count) behind ``CovarianceCache``: ``LocalCovarianceCache`` keeps them
in a directory (the CLI), ``ObjectStoreCovarianceCache`` in object storage (the service,
shared by every job and tenant: see docs/editing.md). C is never replaced by the identity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

import weightsmith
from infra.storage.base import sha256_file
from workers.devices import seeded
from workers.edit.architectures import EditArchitecture
from workers.edit.prompts import pad_id
from workers.edit.tracing import StopForward
from workers.errors import CancelledError, InputError

if TYPE_CHECKING:
    from infra.storage import ObjectStore
    from schemas.edit_recipe import CovarianceSource

log = logging.getLogger("weightsmith.edit.covariance")

_START_WORDS = ("The", "In", "A", "It", "This", "When", "He", "She", "We", "There", "After", "I")
SAMPLING_TOP_K = 50
SAMPLE_BATCH = 16
STATISTIC_ROWS = 512  # tokens per slice of Σaᵀa, with a cancel check between slices


@dataclass(frozen=True)
class CovarianceProgress:
    """Where the covariance phase is: ``sampling`` (the model generating its corpus) or
    ``statistics`` (the forward passes that accumulate C), and how many of the
    ``tokens_total`` tokens C needs are done (sampled or counted into C)."""

    step: Literal["sampling", "statistics"]
    tokens_done: int
    tokens_total: int


@dataclass(frozen=True)
class CovarianceKey:
    model_revision: str
    layer: int
    corpus_hash: str
    tokens: int

    @property
    def file_stem(self) -> str:
        rev = hashlib.sha256(self.model_revision.encode()).hexdigest()[:16]
        return f"{rev}-L{self.layer}-{self.corpus_hash[:16]}-{self.tokens}"


class CovarianceCache(Protocol):
    """Where computed covariances are kept and found again."""

    def get(self, key: CovarianceKey) -> tuple[torch.Tensor, dict[str, Any]] | None: ...

    def put(self, key: CovarianceKey, C: torch.Tensor, provenance: dict[str, Any]) -> None: ...


class LocalCovarianceCache:
    """One safetensors file per key under ``root``; the provenance is in its metadata."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()

    def _path(self, key: CovarianceKey) -> Path:
        return self.root / f"{key.file_stem}.safetensors"

    def get(self, key: CovarianceKey) -> tuple[torch.Tensor, dict[str, Any]] | None:
        from safetensors import safe_open

        path = self._path(key)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("provenance", "{}"))
            if meta.get("key") != asdict(key):  # a hash-prefix collision: not ours
                return None
            return f.get_tensor("C"), meta

    def put(self, key: CovarianceKey, C: torch.Tensor, provenance: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        meta = {"key": asdict(key), **provenance}
        fd, tmp = tempfile.mkstemp(prefix=".cov-", dir=self.root)
        os.close(fd)
        save_file({"C": C.contiguous().cpu()}, tmp, metadata={"provenance": json.dumps(meta)})
        os.replace(tmp, self._path(key))


class ObjectStoreCovarianceCache:
    """Covariances in an object store (local directory, S3, SeaweedFS), one folder per key::

        {prefix}/{stem}/C-{writer}.safetensors   the float32 statistic (tensor "C")
        {prefix}/{stem}/provenance.json          written last, with a conditional create

    An entry exists once its provenance exists; the provenance names the statistic's file
    and its sha256, which every read checks. Concurrent writers of the same key each upload
    their own file; the first provenance wins and the loser deletes its file, so a reader
    never pairs one writer's provenance with another's bytes. A corrupt entry is deleted
    and treated as a miss (it is recomputed). Failing to write is logged, not fatal: the job
    has its C either way.

    ``prefix`` must not be a possible tenant name (artifacts live under ``{tenant}/``);
    the default starts with ``_``, which tenant names cannot.
    """

    PROVENANCE = "provenance.json"

    def __init__(self, store: ObjectStore, prefix: str = "_cache/covariance") -> None:
        self.store = store
        self.prefix = prefix.strip("/")

    def _folder(self, key: CovarianceKey) -> str:
        return f"{self.prefix}/{key.file_stem}/"

    def get(self, key: CovarianceKey) -> tuple[torch.Tensor, dict[str, Any]] | None:
        from safetensors.torch import load_file

        from infra.storage import IntegrityError, ObjectNotFound

        folder = self._folder(key)
        try:
            meta = json.loads(self.store.get_bytes(folder + self.PROVENANCE))
        except ObjectNotFound:
            return None
        except ValueError:
            log.warning("covariance cache %s: unreadable provenance; recomputing", folder)
            self._delete(folder)
            return None
        if not isinstance(meta, dict) or meta.get("key") != asdict(key):
            return None  # a hash-prefix collision: not ours
        with tempfile.TemporaryDirectory(prefix="weightsmith-cov-") as tmp:
            path = Path(tmp) / "C.safetensors"
            try:
                self.store.download_file(
                    folder + str(meta["file"]), path, sha256=str(meta["sha256"])
                )
                C = load_file(str(path))["C"]
            except (IntegrityError, ObjectNotFound, KeyError, ValueError) as e:
                log.warning("covariance cache %s: bad entry (%s); recomputing", folder, e)
                self._delete(folder)
                return None
        return C, meta

    def put(self, key: CovarianceKey, C: torch.Tensor, provenance: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        from infra.storage import ObjectExists, StorageError

        folder = self._folder(key)
        name = f"C-{uuid.uuid4().hex[:12]}.safetensors"
        with tempfile.TemporaryDirectory(prefix="weightsmith-cov-") as tmp:
            path = Path(tmp) / name
            save_file({"C": C.detach().float().contiguous().cpu()}, str(path))
            digest = sha256_file(path)
            meta = {
                "key": asdict(key),
                **provenance,
                "file": name,
                "sha256": digest,
                "size": path.stat().st_size,
            }
            try:
                self.store.put_file(folder + name, path, sha256=digest)
            except StorageError as e:
                log.warning("covariance cache %s: not stored (%s)", folder, e)
                return
        body = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
        try:
            self.store.put_bytes(folder + self.PROVENANCE, body, if_absent=True)
        except ObjectExists:  # another job stored this key first: keep theirs
            self._delete(folder + name)
        except StorageError as e:
            log.warning("covariance cache %s: provenance not stored (%s)", folder, e)
            self._delete(folder + name)

    def _delete(self, key: str) -> None:
        from infra.storage import StorageError

        try:
            self.store.delete_prefix(key)
        except StorageError:
            log.warning("covariance cache: could not delete %s", key)


def default_cache_dir() -> Path:
    env = os.environ.get("WEIGHTSMITH_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "weightsmith"
    return root / "covariance"


# ---------------------------------------------------------------------------------------------
# Corpora: batches of token ids with a mask of the tokens that count.


@dataclass(frozen=True)
class Corpus:
    """A deterministic stream of token batches and the hash that identifies it."""

    description: str
    corpus_hash: str
    # (ids, mask) batches; the argument, when given, is told each step of a sampled batch
    # how many tokens the batch has so far (a text corpus has no such steps)
    batches: Callable[[Callable[[int], None] | None], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    source: str = "text"  # the recipe's covariance.source
    seed: int | None = None  # model_samples only


def sampled_corpus(model: Any, tokenizer: Any, *, seed: int, max_length: int) -> Corpus:
    """Text sampled from the model (top-k 50, seeded) from a few plain start words."""
    spec = f"model_samples/v1 seed={seed} max_length={max_length} top_k={SAMPLING_TOP_K}"

    def batches(
        sampled: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        starts = _single_token_starts(tokenizer)
        g = 0
        while True:
            rows = [starts[(g * SAMPLE_BATCH + i) % len(starts)] for i in range(SAMPLE_BATCH)]
            ids = torch.tensor(rows, device=model.device).unsqueeze(1)
            with seeded(seed + g, model.device):
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    top_k=SAMPLING_TOP_K,
                    top_p=1.0,
                    temperature=1.0,
                    max_new_tokens=max_length - 1,
                    min_new_tokens=max_length - 1,
                    pad_token_id=pad_id(tokenizer),
                    stopping_criteria=_step_watch(sampled),
                )
            yield out, torch.ones_like(out)
            g += 1

    return Corpus(spec, hashlib.sha256(spec.encode()).hexdigest(), batches, "model_samples", seed)


def _step_watch(sampled: Callable[[int], None] | None) -> Any:
    """Stopping criteria that never stop generation but tell ``sampled`` the batch's token
    count after each generated token."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    if sampled is None:
        return None
    told = sampled

    class _Watch(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> Any:
            told(input_ids.numel())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Watch()])


def _single_token_starts(tokenizer: Any) -> list[int]:
    starts = []
    for w in _START_WORDS:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            starts.append(ids[0])
    if not starts:
        starts = [pad_id(tokenizer)]
    bos = tokenizer.bos_token_id
    if bos is not None and getattr(tokenizer, "add_bos_token", False):
        starts = [bos]  # a model trained with BOS always sees it first
    return starts


def text_corpus(
    tokenizer: Any,
    files: Sequence[Path],
    *,
    max_length: int,
    labels: Sequence[str] | None = None,
) -> Corpus:
    """UTF-8 text files, tokenised and cut into sequences of at most max_length tokens.

    The hash covers the files' bytes (not their names or locations), so the same text
    gives the same cache key whether it came from a local path, s3:// or an artifact."""
    h = hashlib.sha256(f"text/v1 max_length={max_length}".encode())
    for f in files:
        h.update(f.read_bytes())
    names = ", ".join(labels if labels is not None else [f.name for f in files])

    def batches(
        _sampled: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rows: list[list[int]] = []
        for f in files:
            for para in f.read_text(encoding="utf-8").split("\n\n"):
                if not para.strip():
                    continue
                ids = tokenizer(para.strip())["input_ids"]
                rows += [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
                while len(rows) >= SAMPLE_BATCH:
                    yield _pad(rows[:SAMPLE_BATCH], pad_id(tokenizer))
                    rows = rows[SAMPLE_BATCH:]
        if rows:
            yield _pad(rows, pad_id(tokenizer))

    return Corpus(f"text files {names}", h.hexdigest(), batches)


def _pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def recipe_corpus(
    source: CovarianceSource,
    model: Any,
    tokenizer: Any,
    *,
    base_dir: Path | None = None,
    corpus_files: Sequence[Path] | None = None,
) -> Corpus:
    """The corpus of the recipe's ``covariance`` section: text sampled from the model, the
    files the service fetched for ``paths`` (``corpus_files``, in order), or else the local
    files of ``paths`` (relative to ``base_dir``). InputError naming ``covariance.paths[i]``
    for a missing file or a reference only the service resolves."""
    if source.source == "model_samples":
        return sampled_corpus(model, tokenizer, seed=source.seed, max_length=source.max_length)
    if corpus_files is not None:  # fetched by the service (s3://, artifact://, local)
        return text_corpus(
            tokenizer, corpus_files, max_length=source.max_length, labels=source.paths
        )
    files = []
    for i, p in enumerate(source.paths):
        if "://" in p:
            raise InputError(
                f"{p!r} resolves only inside the weightsmith service (submit the recipe as a "
                "job) or use a local path",
                field=f"covariance.paths[{i}]",
            )
        path = Path(p).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise InputError(f"no such text file: {path}", field=f"covariance.paths[{i}]")
        files.append(path)
    return text_corpus(tokenizer, files, max_length=source.max_length)


# ---------------------------------------------------------------------------------------------


# Covariances computed by this process (accumulation passes, layers): evidence for tests
# and the bench that a cached C was reused rather than recomputed.
COMPUTED: Counter[str] = Counter()


@torch.no_grad()
def accumulate_covariance(
    model: Any,
    arch: EditArchitecture,
    layers: Sequence[int],
    corpus: Corpus,
    tokens: int,
    cancelled: Callable[[], bool] | None = None,
    progress: Callable[[CovarianceProgress], None] | None = None,
) -> tuple[dict[int, torch.Tensor], int]:
    """C for each layer over the first ``tokens`` counted tokens of the corpus (one pass for
    all layers). Returns ({layer: C}, tokens actually used). ``cancelled`` is checked
    between batches and between slices of STATISTIC_ROWS tokens of each Σaᵀa (the forward
    passes themselves check it per layer: ``EditModel.cancel_points``); ``progress`` is told
    the step and the tokens done after each sampled token and each batch."""
    sums: dict[int, torch.Tensor] = {}
    mask_now: dict[str, torch.Tensor] = {}
    last = max(layers)
    n = 0

    def check() -> None:
        if cancelled is not None and cancelled():
            raise CancelledError("the job was cancelled")

    def report(step: Literal["sampling", "statistics"], done: int) -> None:
        if progress is not None:
            progress(CovarianceProgress(step, min(done, tokens), tokens))

    def make_hook(layer: int) -> Any:
        def hook(_m: Any, args: tuple[Any, ...]) -> None:
            if "m" not in mask_now:  # the corpus generator's own forward passes
                return
            a = args[0][mask_now["m"]].float()
            for i in range(0, a.shape[0], STATISTIC_ROWS):
                check()
                s = a[i : i + STATISTIC_ROWS].T @ a[i : i + STATISTIC_ROWS]
                sums[layer] = sums[layer] + s if layer in sums else s
            if layer == last:
                raise StopForward

        return hook

    handles = [
        model.get_submodule(arch.module_name(layer)).register_forward_pre_hook(make_hook(layer))
        for layer in layers
    ]

    def sampled(count: int) -> None:  # the batch being sampled has ``count`` tokens so far
        report("sampling", n + count)

    try:
        for ids, mask in corpus.batches(sampled):
            check()
            report("statistics", n)
            # keep whole rows until the budget is reached, then a partial row
            budget = tokens - n
            counted = mask.bool().clone()
            flat = counted.flatten().cumsum(0).reshape(counted.shape)
            counted &= flat <= budget
            device = model.device  # the corpus's batches come from the CPU (text files)
            mask_now["m"] = counted.to(device)
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except StopForward:
                pass
            finally:
                del mask_now["m"]
            n += int(counted.sum())
            report("statistics", n)
            if n >= tokens:
                break
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("the covariance corpus has no tokens")
    return {layer: sums[layer] / n for layer in layers}, n


def covariances(
    model: Any,
    arch: EditArchitecture,
    layers: Sequence[int],
    corpus: Corpus,
    tokens: int,
    *,
    model_revision: str,
    cache: CovarianceCache | None,
    model_label: str | None = None,
    cancelled: Callable[[], bool] | None = None,
    progress: Callable[[CovarianceProgress], None] | None = None,
) -> tuple[dict[int, torch.Tensor], list[dict[str, Any]]]:
    """C per layer, from the cache where present, computed (and cached) otherwise.
    Returns the matrices and one provenance record per layer (``"cache": "hit"`` or
    ``"miss"``; a hit carries the provenance of the job that computed it)."""
    out: dict[int, torch.Tensor] = {}
    records: list[dict[str, Any]] = []
    missing = []
    for layer in layers:
        key = CovarianceKey(model_revision, layer, corpus.corpus_hash, tokens)
        hit = cache.get(key) if cache is not None else None
        if hit is None:
            missing.append(layer)
            continue
        out[layer] = hit[0].float()
        records.append({**hit[1], "cache": "hit"})
    if missing:
        started = time.perf_counter()
        computed, n = accumulate_covariance(
            model, arch, missing, corpus, tokens, cancelled, progress
        )
        seconds = time.perf_counter() - started
        COMPUTED["passes"] += 1
        COMPUTED["layers"] += len(missing)
        for layer in missing:
            key = CovarianceKey(model_revision, layer, corpus.corpus_hash, tokens)
            provenance = {
                "model": model_label,
                "model_revision": model_revision,
                "layer": layer,
                "module": arch.module_name(layer),
                "corpus": corpus.description,
                "corpus_source": corpus.source,
                "corpus_hash": corpus.corpus_hash,
                "seed": corpus.seed,
                "tokens": tokens,
                "tokens_used": n,
                "dtype": "float32",
                "seconds": round(seconds, 3),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "code_version": weightsmith.__version__,
            }
            if cache is not None:
                cache.put(key, computed[layer], provenance)
            out[layer] = computed[layer]
            records.append({"key": asdict(key), **provenance, "cache": "miss"})
    records.sort(key=lambda r: r["key"]["layer"])
    return out, records
