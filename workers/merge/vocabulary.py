"""The output vocabulary of a merge and each input's embedding rows in it (mergekit 0.1.5's
``tokenizer_source`` / ``tokenizer:``, mergekit/tokenizer/build.py and embed.py).

When a recipe names a tokenizer plan, the output tokenizer is built with ``transformers``
(the base's, a model's, or the union of the inputs' vocabularies, plus the tokens the
recipe lists), and every tensor with a vocabulary axis (embeddings, output heads) is handed
to the method with each input's rows moved to the output's token ids. A token an input
lacks gets a row by mergekit's rules, the same row for every input that lacks it:

- a token the recipe lists under ``tokens`` with a ``source``: that model's row of the
  token, a ``model_token`` row of a model's own embedding, or zeros;
- else a token only one input has: that input's row;
- a token no input has: zeros;
- a token the base has: the base's row;
- else the mean of the rows of the inputs that have it (summed in input order, in the
  inputs' dtype).

A ``force``d token gets its listed row in every input, even those that have it. Rows past
the vocabulary (``pad_to_multiple_of``) are the mean of each input's rows.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from schemas.recipe import MergeRecipe, ModelTokenSource, TokenEmbedding, ZeroSource
from schemas.references import ModelReference
from workers.errors import InputError
from workers.merge.inputs import read_config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Tensors whose first axis is the vocabulary, by the end of their name: token embeddings
# (Llama and most decoders, GPT-2's tied wte, BLOOM, GPT-NeoX) and output heads.
_VOCAB_TENSORS = (
    "embed_tokens.weight",
    "lm_head.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "embed_out.weight",
)
_VOCAB_KEYS = ("vocab_size", "n_vocab")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_vocabulary_tensor(name: str) -> bool:
    return name == "lm_head.weight" or name.endswith(tuple("." + s for s in _VOCAB_TENSORS))


def config_vocab_size(path: Path) -> int | None:
    cfg = read_config(path)
    for key in _VOCAB_KEYS:
        if isinstance(cfg.get(key), int):
            return int(cfg[key])
    text = cfg.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("vocab_size"), int):
        return int(text["vocab_size"])
    return None


def vocab_size_key(path: Path) -> str:
    """The config key of the vocabulary size in the output's config (from its source)."""
    cfg = read_config(path)
    return next((k for k in _VOCAB_KEYS if k in cfg), "vocab_size")


def mergekit_order(recipe: MergeRecipe) -> list[str]:
    """The inputs in the order mergekit gathers a tensor's inputs (which sets the order of
    summation of a mean row): the models as listed, then an unlisted base; for slices, the
    first slice's sources (embeddings), then the last slice's (output head)."""
    if recipe.slices is not None:
        refs = [s.model for s in recipe.slices[0].sources]
        refs += [s.model for s in recipe.slices[-1].sources]
    else:
        refs = [m.model for m in recipe.models]
        if recipe.base_model is not None:
            refs.append(recipe.base_model)
    return [str(r) for r in refs]


def _folder(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def load_tokenizer(path: Path, label: str, field: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(_folder(path)), use_fast=True)
    except Exception as e:  # transformers raises many kinds for a missing or bad tokenizer
        raise InputError(
            f"its tokenizer cannot be loaded ({type(e).__name__}: {str(e)[:200]}); the "
            "tokenizer plan needs every model's tokenizer files",
            model=label,
            field=field,
        ) from None


@dataclass
class _Model:
    """One input model's vocabulary: token → its row, and its embedding's row count."""

    label: str
    vocab: dict[str, int]
    rows: int


@dataclass
class OutputVocabulary:
    """The output tokenizer and, per input model, where each output token's row is."""

    tokenizer: PreTrainedTokenizerBase
    vocab: dict[str, int]  # output token -> id
    rows: int  # the output's row count (the vocabulary padded to the multiple)
    models: dict[str, _Model]  # by the input's label (its reference as written)
    tokens: dict[str, TokenEmbedding]
    base: str | None  # the label of the recipe's base model
    dtype: torch.dtype | None  # the recipe's working dtype (mergekit's ``dtype``)

    def position(self, label: str) -> torch.Tensor:
        """For each output token id, the row of model ``label`` holding it, or -1."""
        m = self.models[label]
        p = torch.full((len(self.vocab),), -1, dtype=torch.long)
        for tok, i in self.vocab.items():
            j = m.vocab.get(tok)
            if j is not None and j < m.rows:
                p[i] = j
        return p

    def align(self, name: str, tensors: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        """mergekit's PermutedVocabulary for one tensor: ``tensors`` are (model label,
        stored tensor) of every input of ``name`` in mergekit's order; returns each input's
        tensor with ``self.rows`` rows in the output vocabulary, in the same order."""
        labels = [label for label, _ in tensors]
        dtype = self.dtype or tensors[0][1].dtype
        if self.dtype is None:
            for _, t in tensors:
                dtype = torch.promote_types(dtype, t.dtype)
        shape = tensors[0][1].shape[1:]
        for label, t in tensors:
            if t.shape[1:] != shape:
                raise InputError(
                    f"shape {tuple(t.shape)} differs from {tuple(tensors[0][1].shape)} of "
                    f"{labels[0]!r} beyond the vocabulary axis: the hidden sizes differ",
                    model=label,
                    tensor=name,
                )
        olds = [t.to(dtype) for _, t in tensors]
        pos = [self.position(label) for label in labels]
        for label, old, p in zip(labels, olds, pos, strict=True):
            if int(p.max()) >= old.shape[0]:
                raise InputError(
                    f"has {old.shape[0]} rows but its tokenizer and config place tokens up to "
                    f"row {int(p.max())}",
                    model=label,
                    tensor=name,
                )
        n = len(self.vocab)
        fills = self._fills(name, labels, olds, pos, shape, dtype)
        forced = [self.vocab[t] for t, c in self.tokens.items() if c.force]
        out = []
        for k in range(len(labels)):
            p = pos[k]
            new = torch.zeros((self.rows, *shape), dtype=dtype)
            own = p >= 0
            own[forced] = False
            ids = torch.nonzero(own).flatten()
            new[ids] = olds[k][p[ids]]
            for i, row in fills.items():
                if not bool(own[i]):
                    new[i] = row
            if self.rows > n:
                # rows past the vocabulary: the mean of the model's rows (mergekit, after
                # https://nlp.stanford.edu/~johnhew/vocab-expansion.html)
                new[n:] = torch.mean(new[:n], dim=0)
            out.append(new)
        return out

    def _fills(
        self,
        name: str,
        labels: list[str],
        olds: list[torch.Tensor],
        pos: list[torch.Tensor],
        shape: torch.Size,
        dtype: torch.dtype,
    ) -> dict[int, torch.Tensor]:
        """The row of each output token that some input lacks (or that is forced), by id."""
        present = torch.stack([p >= 0 for p in pos])  # inputs × tokens
        count = present.sum(dim=0)
        fills: dict[int, torch.Tensor] = {}
        for tok, cfg in self.tokens.items():
            i = self.vocab[tok]
            if cfg.source is not None and (cfg.force or int(count[i]) < len(labels)):
                fills[i] = self._listed_row(name, tok, i, cfg, labels, olds, pos, shape, dtype)
        base = labels.index(self.base) if self.base in labels else None
        id_to_token = {i: t for t, i in self.vocab.items()}
        for i in torch.nonzero(count < len(labels)).flatten().tolist():
            listed = self.tokens.get(id_to_token[i])
            if listed is not None and listed.source is not None:
                continue
            k = int(count[i])
            if k == 1:
                donor = int(torch.nonzero(present[:, i])[0])
                fills[i] = olds[donor][int(pos[donor][i])]
            elif k == 0:
                fills[i] = torch.zeros(shape, dtype=dtype)
            elif base is not None and int(pos[base][i]) >= 0:
                fills[i] = olds[base][int(pos[base][i])]
            else:
                # mergekit's mean: summed in input order in the working dtype, then divided
                row = torch.zeros(shape, dtype=dtype)
                for j in range(len(labels)):
                    if int(pos[j][i]) >= 0:
                        row = row + olds[j][int(pos[j][i])]
                fills[i] = row / k
        return fills

    def _listed_row(
        self,
        name: str,
        tok: str,
        i: int,
        cfg: TokenEmbedding,
        labels: list[str],
        olds: list[torch.Tensor],
        pos: list[torch.Tensor],
        shape: torch.Size,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The row a ``tokens`` entry with a ``source`` gives token ``tok`` (id ``i``)."""
        field = f"tokenizer.tokens.{tok}.source"
        if isinstance(cfg.source, ZeroSource):
            return torch.zeros(shape, dtype=dtype)
        model = cfg.source_model
        assert model is not None
        label = str(model)
        if label not in labels:
            raise InputError(
                f"token {tok!r} takes its row from {label!r}, which is not an input of this "
                f"tensor (its inputs: {', '.join(repr(x) for x in labels)})",
                field=field,
                tensor=name,
            )
        k = labels.index(label)
        if isinstance(cfg.source, ModelTokenSource):
            src = cfg.source
            j = src.token_id
            if j is None:
                assert src.token is not None
                j = self.models[label].vocab.get(src.token)
                if j is None:
                    raise InputError(
                        f"token {src.token!r} is not in the tokenizer of {label!r}",
                        field=f"{field}.token",
                        model=label,
                    )
            if j >= olds[k].shape[0]:
                raise InputError(
                    f"row {j} is past the {olds[k].shape[0]} rows of {label!r}",
                    field=f"{field}.token_id" if src.token_id is not None else f"{field}.token",
                    model=label,
                    tensor=name,
                )
            return olds[k][j]
        j = int(pos[k][i])
        if j < 0:
            raise InputError(
                f"token {tok!r} is not in the vocabulary of {label!r}, so its row cannot come "
                "from there: name a model that has it, a model_token source, or zero",
                field=field,
                model=label,
            )
        return olds[k][j]


def build_vocabulary(
    recipe: MergeRecipe, paths: dict[str, Path], base_label: str | None, extra: Path | None
) -> OutputVocabulary:
    """The output vocabulary of ``recipe`` (which has a tokenizer plan): ``paths`` are the
    input models' checkpoints by label in recipe order (the base first), ``extra`` the
    folder of a tokenizer ``source`` that is not an input. Follows mergekit's build.py."""
    plan = recipe.vocabulary
    assert plan is not None and paths
    labels = list(paths)
    first = base_label or labels[0]  # mergekit's "base" for the tokenizer
    field = "tokenizer.source" if recipe.tokenizer is not None else "tokenizer_source"
    base_tok = load_tokenizer(paths[first], first, "base_model")
    models: dict[str, _Model] = {}
    tokenizers: dict[str, PreTrainedTokenizerBase] = {}
    for label, path in paths.items():
        tok = base_tok if label == first else load_tokenizer(path, label, "models")
        vocab = dict(tok.get_vocab())
        rows = config_vocab_size(path) or len(vocab)
        if label == first:
            beyond = sorted((i, t) for t, i in vocab.items() if i >= rows)
            if beyond:
                raise InputError(
                    f"its tokenizer has {len(beyond)} token(s) at ids past its vocab_size "
                    f"{rows} (first {beyond[0][1]!r} at {beyond[0][0]}); weightsmith does not "
                    "strip them from the tokenizer as mergekit does",
                    model=label,
                    field=field,
                )
        tokenizers[label] = tok
        models[label] = _Model(label, vocab, rows)
    if isinstance(plan.source, ModelReference):
        src_label = str(plan.source)
        src_path = paths.get(src_label, extra)
        assert src_path is not None
        out = load_tokenizer(src_path, src_label, field)
    elif plan.source == "base":
        out = base_tok
    else:
        out = _union(base_tok, [(models[label], tokenizers[label]) for label in labels])
    have = set(out.get_vocab())
    for new in plan.tokens or {}:
        if new not in have:
            out.add_tokens(new)
            have.add(new)
    vocab = dict(out.get_vocab())
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise InputError(
            "the output tokenizer's ids are not 0…n−1 without gaps, so its rows cannot be laid "
            "out (mergekit writes zero rows there); choose another tokenizer source",
            field=field,
        )
    rows = len(vocab)
    pad = plan.pad_to_multiple_of
    if pad and rows % pad:
        rows += pad - rows % pad
    if plan.source == "base":
        # mergekit adds the tokens to the base's own tokenizer, which is then the base's
        # vocabulary too (a new token past its vocab_size is then one it lacks)
        models[first].vocab = vocab
    return OutputVocabulary(
        tokenizer=out,
        vocab=vocab,
        rows=rows,
        models=models,
        tokens=dict(plan.tokens or {}),
        base=base_label,
        dtype=_DTYPES[recipe.dtype] if recipe.dtype else None,
    )


def _union(
    base_tok: PreTrainedTokenizerBase, models: list[tuple[_Model, PreTrainedTokenizerBase]]
) -> PreTrainedTokenizerBase:
    """mergekit's union tokenizer: the base's, plus every other token of the inputs below
    their vocab_size, in input order and by id within an input (mergekit's order within an
    input is that of a hash map), the inputs' added tokens last with their first settings."""
    from transformers import AutoTokenizer

    words: dict[str, None] = {}
    added: dict[str, Any] = {}
    for m, tok in models:
        for t, i in sorted(m.vocab.items(), key=lambda kv: kv[1]):
            if i < m.rows:
                words.setdefault(t, None)
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if i < m.rows:
                added.setdefault(info.content, info)
    # a copy of the base's tokenizer, through its files, as mergekit does
    with tempfile.TemporaryDirectory() as d:
        base_tok.save_pretrained(d, legacy_format=False)
        res = AutoTokenizer.from_pretrained(d, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in words:
        if t not in added and t not in base_vocab:
            res.add_tokens(t)
    for info in added.values():
        res.add_tokens(info)
    return res
