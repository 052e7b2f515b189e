"""C = (1/N) Σ aᵀa: the uncentred second moment of an edited module's input a over every
non-padding token of a corpus (ROME §3.1 "mom2", MEMIT eq. 14), accumulated in float32.

The corpus is a recipe choice (no download at run time): text the user supplies, or text
sampled from the model itself with a seed. A sampled corpus is counted into C while it is
sampled (:func:`sample_with_statistics`: one KV-cached pass, the key of a token is read
when the model processes it), then kept by content (its token ids, keyed by the sampling
model's revision and the sampling spec) so that later edits, on this model or on its
edited descendants, count the same tokens. A text corpus, or a kept sampled one, is counted
by forward passes stopped after the last traced layer.

Each C is cached by (hash of the tensors that feed the layer's key, layer, corpus hash,
token count) behind ``CovarianceCache``: editing a layer's output projection, or any later
layer, leaves the C of that layer and of every earlier one valid. ``LocalCovarianceCache``
keeps them in a directory (the CLI), ``ObjectStoreCovarianceCache`` in object storage (the
service, shared by every job and tenant: see docs/editing.md). C is never replaced by the
identity.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

import weightsmith
from infra.storage.base import sha256_file
from workers.edit.architectures import EditArchitecture, feeding_tensors, num_layers
from workers.edit.prompts import pad_id
from workers.edit.tracing import StopForward, decode_step
from workers.errors import CancelledError, InputError

if TYPE_CHECKING:
    from infra.storage import ObjectStore
    from schemas.edit_recipe import CovarianceSource

log = logging.getLogger("weightsmith.edit.covariance")

_START_WORDS = ("The", "In", "A", "It", "This", "When", "He", "She", "We", "There", "After", "I")
SAMPLING_TOP_K = 50
SAMPLED_SPEC = "model_samples/v2"  # bump when the sampled text changes for the same seed
SAMPLE_BATCH = 16  # rows per forward pass of a text corpus or a kept sampled one
SAMPLE_ROWS = 64  # rows sampled at once: fewer, larger decode steps (bounded by the KV cache)
KV_CACHE_BYTES = 1 << 30  # the KV cache of one sampled batch stays under this
STATISTIC_ROWS = 512  # tokens per slice of Σaᵀa, with a cancel check between slices


@dataclass(frozen=True)
class CovarianceProgress:
    """Where the covariance phase is: ``sampling`` (the model generating its corpus, each
    token counted into C as it is processed) or ``statistics`` (forward passes over a text
    corpus or a kept sampled one), and how many of the ``tokens_total`` tokens C needs are
    counted."""

    step: Literal["sampling", "statistics"]
    tokens_done: int
    tokens_total: int


@dataclass(frozen=True)
class CovarianceKey:
    """What a C depends on. ``inputs``: the hash of the tensors that feed the layer's key
    (:func:`feeding_hashes`), or a whole-model revision where they cannot be hashed."""

    inputs: str
    layer: int
    corpus_hash: str
    tokens: int

    @property
    def file_stem(self) -> str:
        rev = hashlib.sha256(self.inputs.encode()).hexdigest()[:16]
        return f"{rev}-L{self.layer}-{self.corpus_hash[:16]}-{self.tokens}"


@dataclass(frozen=True)
class SampleKey:
    """Where a sampled corpus's token ids are kept: the revision of the model that sampled
    them, the sampling spec (seed included) and the token count."""

    sampler: str
    spec: str
    tokens: int

    @property
    def file_stem(self) -> str:
        h = hashlib.sha256(f"{self.sampler}\0{self.spec}".encode()).hexdigest()[:32]
        return f"samples-{h}-{self.tokens}"


class CovarianceCache(Protocol):
    """Where computed covariances (tensor "C") and sampled corpora (tensor "ids", int32
    [rows, max_length]) are kept and found again."""

    def get(self, key: CovarianceKey) -> tuple[torch.Tensor, dict[str, Any]] | None: ...

    def put(self, key: CovarianceKey, C: torch.Tensor, provenance: dict[str, Any]) -> None: ...

    def get_samples(self, key: SampleKey) -> tuple[torch.Tensor, dict[str, Any]] | None: ...

    def put_samples(
        self, key: SampleKey, ids: torch.Tensor, provenance: dict[str, Any]
    ) -> None: ...


class _KeyedFiles(ABC):
    """A :class:`CovarianceCache` over one tensor file per key: a covariance is tensor "C"
    (float32), a sampled corpus tensor "ids"; the key (as a dict) is stored with the
    provenance and compared on read, so a hash-prefix collision is a miss."""

    def get(self, key: CovarianceKey) -> tuple[torch.Tensor, dict[str, Any]] | None:
        return self._get(key.file_stem, asdict(key), "C")

    def put(self, key: CovarianceKey, C: torch.Tensor, provenance: dict[str, Any]) -> None:
        self._put(key.file_stem, asdict(key), "C", C.detach().float(), provenance)

    def get_samples(self, key: SampleKey) -> tuple[torch.Tensor, dict[str, Any]] | None:
        return self._get(key.file_stem, asdict(key), "ids")

    def put_samples(self, key: SampleKey, ids: torch.Tensor, provenance: dict[str, Any]) -> None:
        self._put(key.file_stem, asdict(key), "ids", ids, provenance)

    @abstractmethod
    def _get(
        self, stem: str, key: dict[str, Any], tensor: str
    ) -> tuple[torch.Tensor, dict[str, Any]] | None: ...

    @abstractmethod
    def _put(
        self,
        stem: str,
        key: dict[str, Any],
        tensor: str,
        value: torch.Tensor,
        provenance: dict[str, Any],
    ) -> None: ...


class LocalCovarianceCache(_KeyedFiles):
    """One safetensors file per key under ``root``; the provenance is in its metadata."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()

    def _get(
        self, stem: str, key: dict[str, Any], tensor: str
    ) -> tuple[torch.Tensor, dict[str, Any]] | None:
        from safetensors import safe_open

        path = self.root / f"{stem}.safetensors"
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("provenance", "{}"))
            if meta.get("key") != key:  # a hash-prefix collision: not ours
                return None
            return f.get_tensor(tensor), meta

    def _put(
        self,
        stem: str,
        key: dict[str, Any],
        tensor: str,
        value: torch.Tensor,
        provenance: dict[str, Any],
    ) -> None:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        meta = {"key": key, **provenance}
        fd, tmp = tempfile.mkstemp(prefix=".cov-", dir=self.root)
        os.close(fd)
        save_file(
            {tensor: value.contiguous().cpu()}, tmp, metadata={"provenance": json.dumps(meta)}
        )
        os.replace(tmp, self.root / f"{stem}.safetensors")


class ObjectStoreCovarianceCache(_KeyedFiles):
    """Covariances in an object store (local directory, S3, SeaweedFS), one folder per key::

        {prefix}/{stem}/C-{writer}.safetensors   the float32 statistic (tensor "C")
        {prefix}/{stem}/provenance.json          written last, with a conditional create
        {prefix}/samples-{h}-{tokens}/ids-{writer}.safetensors   a sampled corpus (the same)

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

    def _get(
        self, stem: str, key: dict[str, Any], tensor: str
    ) -> tuple[torch.Tensor, dict[str, Any]] | None:
        from safetensors.torch import load_file

        from infra.storage import IntegrityError, ObjectNotFound

        folder = f"{self.prefix}/{stem}/"
        try:
            meta = json.loads(self.store.get_bytes(folder + self.PROVENANCE))
        except ObjectNotFound:
            return None
        except ValueError:
            log.warning("covariance cache %s: unreadable provenance; recomputing", folder)
            self._delete(folder)
            return None
        if not isinstance(meta, dict) or meta.get("key") != key:
            return None  # a hash-prefix collision: not ours
        with tempfile.TemporaryDirectory(prefix="weightsmith-cov-") as tmp:
            path = Path(tmp) / "entry.safetensors"
            try:
                self.store.download_file(
                    folder + str(meta["file"]), path, sha256=str(meta["sha256"])
                )
                value = load_file(str(path))[tensor]
            except (IntegrityError, ObjectNotFound, KeyError, ValueError) as e:
                log.warning("covariance cache %s: bad entry (%s); recomputing", folder, e)
                self._delete(folder)
                return None
        return value, meta

    def _put(
        self,
        stem: str,
        key: dict[str, Any],
        tensor: str,
        value: torch.Tensor,
        provenance: dict[str, Any],
    ) -> None:
        from safetensors.torch import save_file

        from infra.storage import ObjectExists, StorageError

        folder = f"{self.prefix}/{stem}/"
        name = f"{tensor}-{uuid.uuid4().hex[:12]}.safetensors"
        with tempfile.TemporaryDirectory(prefix="weightsmith-cov-") as tmp:
            path = Path(tmp) / name
            save_file({tensor: value.detach().contiguous().cpu()}, str(path))
            digest = sha256_file(path)
            meta = {
                "key": key,
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
    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # (ids, mask) batches
    source: str = "text"  # the recipe's covariance.source
    seed: int | None = None  # model_samples only
    samples: SampleKey | None = None  # a kept sampled corpus: where its ids are kept


@dataclass(frozen=True)
class SampledCorpus:
    """Text the model samples itself (top-k 50, seeded) from a few plain start words.

    Row r starts with start word r (cycling) and draws each next token from its own
    generator, seeded by (seed, r): the text does not depend on how rows are batched.

    Kept samples of this spec count as this corpus when found under ``parents`` (an edited
    model's parent edit: (sampler revision, content hash), the hash required to match, so
    naming a revision alone reveals nothing), then under ``sampler``, the model's own
    revision, under which fresh samples are kept."""

    model: Any
    tokenizer: Any
    seed: int
    max_length: int
    sampler: str
    parents: tuple[tuple[str, str], ...] = ()

    @property
    def spec(self) -> str:
        return (
            f"{SAMPLED_SPEC} seed={self.seed} max_length={self.max_length} top_k={SAMPLING_TOP_K}"
        )


def sampled_corpus(
    model: Any,
    tokenizer: Any,
    *,
    seed: int,
    max_length: int,
    sampler: str,
    parents: Sequence[tuple[str, str]] = (),
) -> SampledCorpus:
    """The model's own text as a covariance corpus (see :class:`SampledCorpus`)."""
    return SampledCorpus(model, tokenizer, seed, max_length, sampler, tuple(parents))


def samples_hash(spec: str, ids: torch.Tensor) -> str:
    """The content address of a sampled corpus: its spec and its token ids."""
    h = hashlib.sha256(f"{spec} rows={ids.shape[0]}\0".encode())
    h.update(ids.to(torch.int32).contiguous().numpy().tobytes())
    return h.hexdigest()


def samples_corpus(ids: torch.Tensor, spec: str, seed: int, key: SampleKey) -> Corpus:
    """Kept sampled token ids [rows, max_length] as a corpus (every token counts)."""
    rows = ids.long()

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, rows.shape[0], SAMPLE_BATCH):
            batch = rows[i : i + SAMPLE_BATCH]
            yield batch, torch.ones_like(batch)

    return Corpus(spec, samples_hash(spec, ids), batches, "model_samples", seed, key)


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

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
    sampler: str,
    parents: Sequence[tuple[str, str]] = (),
) -> Corpus | SampledCorpus:
    """The corpus of the recipe's ``covariance`` section: text sampled from the model (kept
    under ``sampler``, or found under ``parents``: :class:`SampledCorpus`), the files the
    service fetched for ``paths`` (``corpus_files``, in order), or else the local files of
    ``paths`` (relative to ``base_dir``). InputError naming ``covariance.paths[i]`` for a
    missing file or a reference only the service resolves."""
    if source.source == "model_samples":
        return sampled_corpus(
            model,
            tokenizer,
            seed=source.seed,
            max_length=source.max_length,
            sampler=sampler,
            parents=parents,
        )
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


# Covariances computed by this process (accumulation passes, layers) and corpora sampled:
# evidence for tests and the bench that a cached C or a kept corpus was reused.
COMPUTED: Counter[str] = Counter()


class _SecondMoments:
    """Σaᵀa per layer in float32, fed a few rows at a time and summed in slices of
    STATISTIC_ROWS rows (``check`` runs before each slice)."""

    def __init__(self, layers: Iterable[int], check: Callable[[], None]) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.pending: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        self.rows = dict.fromkeys(self.pending, 0)
        self.check = check

    def add(self, layer: int, a: torch.Tensor) -> None:
        self.pending[layer].append(a.float())
        self.rows[layer] += a.shape[0]
        if self.rows[layer] >= STATISTIC_ROWS:
            self.flush(layer)

    def flush(self, layer: int) -> None:
        if not self.pending[layer]:
            return
        a = torch.cat(self.pending[layer])
        self.pending[layer], self.rows[layer] = [], 0
        for i in range(0, a.shape[0], STATISTIC_ROWS):
            self.check()
            s = a[i : i + STATISTIC_ROWS].T @ a[i : i + STATISTIC_ROWS]
            if layer in self.sums:
                self.sums[layer].add_(s)  # in place: no second d×d buffer
            else:
                self.sums[layer] = s

    def means(self, n: int) -> dict[int, torch.Tensor]:
        for layer in self.pending:
            self.flush(layer)
        if n == 0:
            raise ValueError("the covariance corpus has no tokens")
        return {layer: self.sums[layer] / n for layer in self.pending}


def _cancel_check(cancelled: Callable[[], bool] | None) -> Callable[[], None]:
    def check() -> None:
        if cancelled is not None and cancelled():
            raise CancelledError("the job was cancelled")

    return check


def _reporter(
    progress: Callable[[CovarianceProgress], None] | None, tokens: int
) -> Callable[[Literal["sampling", "statistics"], int], None]:
    def report(step: Literal["sampling", "statistics"], done: int) -> None:
        if progress is not None:
            progress(CovarianceProgress(step, min(done, tokens), tokens))

    return report


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
    all layers, stopped after the last). Returns ({layer: C}, tokens actually used).
    ``cancelled`` is checked between batches and between slices of STATISTIC_ROWS tokens of
    each Σaᵀa (the forward passes themselves check it per layer:
    ``EditModel.cancel_points``); ``progress`` is told the tokens counted before and after
    each batch (step ``statistics``)."""
    check = _cancel_check(cancelled)
    report = _reporter(progress, tokens)
    moments = _SecondMoments(layers, check)
    mask_now: dict[str, torch.Tensor] = {}
    last = max(layers)
    n = 0

    def make_hook(layer: int) -> Any:
        def hook(_m: Any, args: tuple[Any, ...]) -> None:
            moments.add(layer, args[0][mask_now["m"]])
            if layer == last:
                raise StopForward

        return hook

    handles = [
        model.get_submodule(arch.module_name(layer)).register_forward_pre_hook(make_hook(layer))
        for layer in layers
    ]
    try:
        for ids, mask in corpus.batches():
            check()
            report("statistics", n)
            # keep whole rows until the budget is reached, then a partial row
            budget = tokens - n
            counted = mask.bool().clone()
            flat = counted.flatten().cumsum(0).reshape(counted.shape)
            counted &= flat <= budget
            device = model.device  # the corpus's batches come from the CPU (text files)
            mask_now["m"] = counted.to(device)
            with contextlib.suppress(StopForward):
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            n += int(counted.sum())
            report("statistics", n)
            if n >= tokens:
                break
    finally:
        for h in handles:
            h.remove()
    return moments.means(n), n


def sample_rows(model: Any, arch: EditArchitecture, max_length: int) -> int:
    """Rows sampled at once: SAMPLE_ROWS, fewer where their float32 KV cache would pass
    KV_CACHE_BYTES (2 × layers × max_length × KV width × 4 bytes per row)."""
    config = model.config
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    per_row = 2 * num_layers(arch, config) * max_length * kv_heads * head_dim * 4
    return max(1, min(SAMPLE_ROWS, KV_CACHE_BYTES // per_row))


def _row_generator(seed: int, row: int) -> torch.Generator:
    digest = hashlib.sha256(f"{SAMPLED_SPEC} {seed} {row}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.no_grad()
def sample_with_statistics(
    corpus: SampledCorpus,
    arch: EditArchitecture,
    layers: Sequence[int],
    tokens: int,
    cancelled: Callable[[], bool] | None = None,
    progress: Callable[[CovarianceProgress], None] | None = None,
    *,
    rows_at_once: int | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor], int]:
    """Sample ⌈tokens / max_length⌉ rows of ``max_length`` tokens and count the first
    ``tokens`` of them (row after row) into C for each layer, in the same pass.

    Decoding is incremental (KV cache), ``rows_at_once`` rows per batch (default
    :func:`sample_rows`). The key of a token is the edited module's input when the model
    processes that token; with causal attention that is what a full-sequence forward of the
    finished rows computes, up to float32 rounding (tests compare the two). At each step
    the next token is drawn from the top-k 50 of the next-token distribution by inverse
    CDF with the row's own uniform draw. The last step feeds the last token only to count
    it (no logits; the pass stops after the last traced layer).

    Returns (ids int32 [rows, max_length], {layer: C}, tokens counted). ``cancelled`` is
    checked every step and between slices of Σaᵀa (and, under ``EditModel.cancel_points``,
    before every layer); ``progress`` is told after every step (step ``sampling``)."""
    model, T = corpus.model, corpus.max_length
    check = _cancel_check(cancelled)
    report = _reporter(progress, tokens)
    moments = _SecondMoments(layers, check)
    rows = -(-tokens // T)
    B = rows_at_once or sample_rows(model, arch, T)
    starts = _single_token_starts(corpus.tokenizer)
    # the ids and the draws stay on the CPU (the text does not depend on the device); the
    # model's inputs and the counting masks go to its device
    device = model.device
    ids = torch.zeros((rows, T), dtype=torch.long)
    # rows r0..r1 being sampled; which of them count at this step; is it the last step
    now: dict[str, Any] = {}
    last = max(layers)
    n = 0

    def make_hook(layer: int) -> Any:
        def hook(_m: Any, args: tuple[Any, ...]) -> None:
            a = args[0][:, -1]
            moments.add(layer, a[now["counted"]])
            if layer == last and now["final"]:
                raise StopForward

        return hook

    handles = [
        model.get_submodule(arch.module_name(layer)).register_forward_pre_hook(make_hook(layer))
        for layer in layers
    ]
    try:
        for r0 in range(0, rows, B):
            r1 = min(rows, r0 + B)
            ids[r0:r1, 0] = torch.tensor([starts[r % len(starts)] for r in range(r0, r1)])
            uniforms = torch.stack(  # [T, rows]: step t's draws are contiguous
                [torch.rand(T, generator=_row_generator(corpus.seed, r)) for r in range(r0, r1)],
                dim=1,
            )
            lengths = (tokens - torch.arange(r0, r1) * T).clamp(0, T)  # counted per row
            cache = None
            for t in range(T):
                check()
                now["counted"] = (lengths > t).to(device)
                now["final"] = t == T - 1
                try:
                    h, cache = decode_step(model, ids[r0:r1, t : t + 1].to(device), cache)
                except StopForward:
                    h = None
                n += int(now["counted"].sum())
                if h is not None:
                    ids[r0:r1, t + 1] = _top_k_sample(model, h, uniforms[t + 1])
                report("sampling", n)
            del cache
    finally:
        for handle in handles:
            handle.remove()
    return ids.to(torch.int32), moments.means(n), n


def _top_k_sample(model: Any, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Next tokens from the last hidden states ``h`` [B, d]: top-k of the model's logits
    (Gemma-2's soft cap applied), softmax, inverse CDF at the uniforms ``u`` [B]."""
    logits = model.get_output_embeddings()(h).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    k = min(SAMPLING_TOP_K, logits.shape[-1])
    top, index = logits.topk(k, dim=-1)
    cdf = torch.softmax(top, dim=-1).cumsum(-1)
    pick = torch.searchsorted(cdf, u.to(cdf.device).unsqueeze(1)).clamp(max=k - 1)
    return index.gather(1, pick).squeeze(1).cpu()


def covariances(
    model: Any,
    arch: EditArchitecture,
    layers: Sequence[int],
    corpus: Corpus | SampledCorpus,
    tokens: int,
    *,
    model_revision: str,
    cache: CovarianceCache | None,
    feeds: Mapping[int, str] | None = None,
    model_label: str | None = None,
    cancelled: Callable[[], bool] | None = None,
    progress: Callable[[CovarianceProgress], None] | None = None,
) -> tuple[dict[int, torch.Tensor], list[dict[str, Any]]]:
    """C per layer, from the cache where present, computed (and cached) otherwise.

    ``feeds``: per layer, the hash of the tensors feeding its key (:func:`feeding_hashes`);
    default ``model_revision`` for every layer (correct, but any change of the model then
    misses). A :class:`SampledCorpus` is looked up among the kept samples of its
    ``parents`` and ``sampler``; when none is kept it is sampled now with every layer
    counted on the fly (:func:`sample_with_statistics`) and kept. Returns the matrices and
    one provenance record per layer (``"cache": "hit"`` or ``"miss"``; a hit carries the
    provenance of the job that computed it)."""
    inputs = {layer: (feeds or {}).get(layer, model_revision) for layer in layers}
    out: dict[int, torch.Tensor] = {}
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    if isinstance(corpus, SampledCorpus):
        kept = _kept_samples(corpus, tokens, cache)
        if kept is None:
            ids, computed, n = sample_with_statistics(
                corpus, arch, layers, tokens, cancelled, progress
            )
            COMPUTED["samples"] += 1
            where = SampleKey(corpus.sampler, corpus.spec, tokens)
            kept = samples_corpus(ids, corpus.spec, corpus.seed, where)
            if cache is not None:
                cache.put_samples(where, ids, _samples_provenance(kept, where, model_label))
            _store(
                computed, n, kept, arch, inputs, tokens, time.perf_counter() - started,
                cache, records, out, model_revision, model_label,
            )  # fmt: skip
            return out, sorted(records, key=lambda r: r["key"]["layer"])
        corpus = kept
    missing = []
    for layer in layers:
        key = CovarianceKey(inputs[layer], layer, corpus.corpus_hash, tokens)
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
        _store(
            computed, n, corpus, arch, inputs, tokens, time.perf_counter() - started,
            cache, records, out, model_revision, model_label,
        )  # fmt: skip
    return out, sorted(records, key=lambda r: r["key"]["layer"])


def _kept_samples(
    corpus: SampledCorpus, tokens: int, cache: CovarianceCache | None
) -> Corpus | None:
    """The kept samples of ``corpus``: its parents' (when their content hash is the one the
    parent recorded), else its own sampler's."""
    if cache is None:
        return None
    for sampler, expected in (*corpus.parents, (corpus.sampler, None)):
        key = SampleKey(sampler, corpus.spec, tokens)
        hit = cache.get_samples(key)
        if hit is None:
            continue
        kept = samples_corpus(hit[0], corpus.spec, corpus.seed, key)
        if kept.corpus_hash != (expected or hit[1].get("corpus_hash")):
            log.warning("covariance cache: kept samples %s are not the recorded ones", key)
            continue
        return kept
    return None


def _samples_provenance(corpus: Corpus, key: SampleKey, label: str | None) -> dict[str, Any]:
    return {
        "model": label,
        "sampler": key.sampler,
        "spec": key.spec,
        "tokens": key.tokens,
        "corpus_hash": corpus.corpus_hash,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": weightsmith.__version__,
    }


def _store(
    computed: dict[int, torch.Tensor],
    n: int,
    corpus: Corpus,
    arch: EditArchitecture,
    inputs: Mapping[int, str],
    tokens: int,
    seconds: float,
    cache: CovarianceCache | None,
    records: list[dict[str, Any]],
    out: dict[int, torch.Tensor],
    model_revision: str,
    model_label: str | None,
) -> None:
    """Cache each freshly computed C with its provenance; add it to ``out``/``records``."""
    COMPUTED["passes"] += 1
    COMPUTED["layers"] += len(computed)
    for layer, C in computed.items():
        key = CovarianceKey(inputs[layer], layer, corpus.corpus_hash, tokens)
        provenance = {
            "model": model_label,
            "model_revision": model_revision,
            "layer": layer,
            "module": arch.module_name(layer),
            "corpus": corpus.description,
            "corpus_source": corpus.source,
            "corpus_hash": corpus.corpus_hash,
            "corpus_samples": asdict(corpus.samples) if corpus.samples else None,
            "seed": corpus.seed,
            "tokens": tokens,
            "tokens_used": n,
            "dtype": "float32",
            "seconds": round(seconds, 3),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "code_version": weightsmith.__version__,
        }
        if cache is not None:
            cache.put(key, C, provenance)
        out[layer] = C
        records.append({"key": asdict(key), **provenance, "cache": "miss"})


# ---------------------------------------------------------------------------------------------
# The cache identity of a layer's C: the tensors that feed its key.


def feeding_hashes(
    folder: Path,
    arch: EditArchitecture,
    config: Any,
    layers: Iterable[int],
    cancelled: Callable[[], bool] | None = None,
) -> dict[int, str] | None:
    """Per layer, sha256 over the model config (``_``-prefixed fields aside) and the name,
    dtype, shape and bytes of every stored tensor that feeds the layer's key
    (:func:`~workers.edit.architectures.feeding_tensors`), streamed from the safetensors
    files of ``folder`` (each tensor read once, whatever the number of layers; ``cancelled``
    checked every 8 MiB). None when the checkpoint is not safetensors (the caller keys by
    the whole model then)."""
    from workers.errors import CheckpointError
    from workers.tensors import CheckpointReader

    try:
        reader = CheckpointReader(folder)
    except CheckpointError:
        return None
    settings = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    settings.pop("transformers_version", None)
    head = json.dumps({"arch": arch.name, "config": settings}, sort_keys=True, default=str)
    digests: dict[str, str] = {}
    out = {}
    with reader:
        for layer in layers:
            h = hashlib.sha256(head.encode())
            for name in feeding_tensors(arch, config, reader.names, layer):
                if name not in digests:
                    digests[name] = _tensor_digest(reader.info(name), _cancel_check(cancelled))
                info = reader.info(name)
                h.update(f"\0{name}\0{info.dtype}\0{list(info.shape)}\0{digests[name]}".encode())
            out[layer] = "feeds:" + h.hexdigest()
    return out


def _tensor_digest(info: Any, check: Callable[[], None]) -> str:
    h = hashlib.sha256()
    with info.file.open("rb") as f:
        f.seek(info.start)
        left = info.nbytes
        while left > 0:
            check()
            block = f.read(min(left, 8 << 20))
            if not block:
                raise ValueError(f"{info.file}: truncated at tensor {info.name}")
            h.update(block)
            left -= len(block)
    return h.hexdigest()
