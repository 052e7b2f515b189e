"""The output directory of a merge: config, tokenizer, model card and manifest.

The shards and index are written by the engine; this module adds the rest into the same
staging directory. The manifest comes last: it lists every other file with its size and
sha256, so its presence marks a complete artifact.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

import weightsmith
from infra.artifacts import folder_files, write_manifest
from schemas.chat_templates import NAMED_TEMPLATES
from schemas.manifests import MANIFEST_FORMAT, Manifest, ManifestParent
from schemas.recipe import MergeRecipe
from workers.errors import InputError
from workers.sources import ResolvedModel
from workers.sources.selection import TOKENIZER_FILES, TOKENIZER_PATTERNS

INDEX = "model.safetensors.index.json"


def manifest_parent(role: str, r: ResolvedModel, **extra: Any) -> dict[str, Any]:
    """A manifest's ``parents`` entry for an input: its role, the reference as written, as
    pinned, and its revision (plus ``extra`` fields such as ``expert`` or ``applied_to``)."""
    return {
        "role": role,
        "reference": str(r.reference),
        "pinned": str(r.pinned),
        "revision": r.revision,
        **extra,
    }


def adapter_parents(
    inputs: Iterable[tuple[ResolvedModel, ResolvedModel | None]],
) -> list[dict[str, Any]]:
    """The ``adapter`` parents of BASE+ADAPTER inputs, given as (base, adapter or None)."""
    return [
        manifest_parent("adapter", adapter, applied_to=str(base.reference))
        for base, adapter in inputs
        if adapter is not None
    ]


def write_output_manifest(
    staging: Path,
    *,
    kind: str,
    name: str,
    recipe: Any,
    seed: int | None,
    parents: list[dict[str, Any]],
    metrics: dict[str, Any],
    timings: dict[str, float],
    known: dict[str, tuple[int, str]] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """The ``manifest.json`` of a job's output built in ``staging`` (written last: it lists
    every other file there with size and sha256, ``known`` digests reused), validated
    against the manifest schema. ``fields``: kind-specific entries (``tokenizer_files``)."""
    manifest = Manifest.model_validate(
        {
            "format": MANIFEST_FORMAT,
            "kind": kind,
            "name": name,
            "seed": seed,
            "code_version": weightsmith.__version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "parents": parents,
            "recipe": recipe.model_dump(mode="json", exclude_none=True),
            **fields,
            "metrics": metrics,
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "files": [f.model_dump() for f in folder_files(staging, known=known)],
        }
    )
    return write_manifest(staging, manifest)


class StagedOutput:
    """Where a job's output is built before it is published all at once: ``.NAME.partial-PID``
    beside ``out_dir``. ``out_dir`` must not exist or be an empty folder (``InputError``
    naming ``out`` otherwise, before any work). :meth:`publish` renames the staging folder to
    ``out_dir``; :meth:`discard` (on any failure) removes it and the parent folders this run
    would have created, so nothing is left behind."""

    def __init__(self, out_dir: Path) -> None:
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise InputError(
                f"output directory {str(out_dir)!r} already exists and is not empty", field="out"
            )
        self.out_dir = out_dir
        self.path = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
        # parent folders that do not exist yet (innermost first): removed again on failure
        self._new_parents = [d for d in (out_dir.parent, *out_dir.parent.parents) if not d.exists()]
        shutil.rmtree(self.path, ignore_errors=True)

    def publish(self) -> None:
        if self.out_dir.exists():
            self.out_dir.rmdir()
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.path.rename(self.out_dir)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        for d in self._new_parents:
            try:
                d.rmdir()
            except OSError:
                break


def _has_lm_head(staging: Path) -> bool:
    index = json.loads((staging / INDEX).read_text())
    return any(n == "lm_head.weight" or n.endswith(".lm_head.weight") for n in index["weight_map"])


def write_config(
    source: Path, staging: Path, out_dtype: str | None, updates: dict[str, Any] | None = None
) -> None:
    """config.json of the base with its dtype and tie_word_embeddings made true to the
    output, and ``updates`` (a sliced merge's layer count and per-layer lists) applied."""
    src_dir = source if source.is_dir() else source.parent
    cfg_path = src_dir / "config.json"
    if not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text())
    cfg.update(updates or {})
    if out_dtype:
        keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
        for k in keys:
            cfg[k] = out_dtype
    head = _has_lm_head(staging)
    if (
        head
        or "tie_word_embeddings" in cfg
        or any("embed" in n for n in json.loads((staging / INDEX).read_text())["weight_map"])
    ):
        # transformers ties lm_head to the embeddings unless told otherwise: say which
        cfg["tie_word_embeddings"] = not head
    (staging / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = src_dir / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, staging / gen.name)


def copy_tokenizer(source: Path | None, staging: Path) -> list[str]:
    if source is None:
        return []
    src_dir = source if source.is_dir() else source.parent
    files = [src_dir / n for n in TOKENIZER_FILES]
    files += [f for pattern in TOKENIZER_PATTERNS for f in src_dir.glob(pattern)]
    copied = []
    for f in sorted(files):
        if f.is_file():
            shutil.copyfile(f, staging / f.name)
            copied.append(f.name)
    return copied


def save_tokenizer(tokenizer: Any, chat_template: str | None, staging: Path) -> list[str]:
    """Write ``tokenizer`` (a transformers tokenizer: a merge's output vocabulary, or the
    source's to give it a chat template) with ``chat_template`` set, as mergekit does;
    returns the files written."""
    before = set(p.name for p in staging.iterdir())
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(staging))
    return sorted(p.name for p in staging.iterdir() if p.name not in before)


def output_chat_template(recipe: MergeRecipe, tokenizer_dirs: list[Path]) -> str | None:
    """The recipe's ``chat_template``: its Jinja text, or for ``auto`` the template most
    inputs' tokenizers have (mergekit's plurality rule; None when none has one)."""
    from collections import Counter

    from transformers import AutoTokenizer

    if recipe.chat_template in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[recipe.chat_template]
    if recipe.chat_template is None or recipe.chat_template != "auto":
        return recipe.chat_template
    found = []
    for d in tokenizer_dirs:
        try:
            template = AutoTokenizer.from_pretrained(str(d)).chat_template
        except Exception:  # mergekit skips a model whose tokenizer does not load
            continue
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            found.append(str(template).strip())
    return Counter(found).most_common(1)[0][0] if found else None


def _parent_ref(r: ResolvedModel) -> str:
    return str(r.pinned)


def model_card(recipe: MergeRecipe, parents: list[ResolvedModel], title: str) -> str:
    """README.md with Hub model-card front matter for a merge."""
    hub_parents = [str(p.pinned.location) for p in parents if p.pinned.kind.value == "hub"]
    front: dict[str, Any] = {
        "base_model": hub_parents or [_parent_ref(p) for p in parents],
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["merge", "weightsmith", recipe.merge_method],
    }
    spec = recipe.method
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        f"This model was merged with weightsmith {weightsmith.__version__} using "
        f"**{spec.title}** ({spec.reference}).",
        "",
        "## Parents",
        "",
    ]
    for p in parents:
        rev = f" at revision `{p.revision}`" if p.revision else ""
        lines.append(f"- `{p.reference}` → `{_parent_ref(p)}`{rev}")
    lines += [
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def finalize_output(
    staging: Path,
    *,
    recipe: MergeRecipe,
    seed: int,
    base: ResolvedModel | None,
    models: list[ResolvedModel],
    config_source: Path,
    config_updates: dict[str, Any] | None = None,
    tokenizer_source: Path | None,
    written: Iterable[Path],
    tokenizer: Any = None,
    writer_digests: dict[str, tuple[int, str]],
    out_dtype: str | None,
    notes: list[str],
    timings: dict[str, float],
    started: float,
    publish_started: float,
    adapters: Sequence[tuple[ResolvedModel, ResolvedModel]] = (),
) -> dict[str, Any]:
    """Write config, tokenizer, model card and (last) the manifest; return the manifest.
    ``adapters``: (checkpoint, LoRA adapter applied to it) of each BASE+ADAPTER input, listed
    among the parents with role ``adapter``. ``tokenizer``: the output vocabulary's
    tokenizer under a tokenizer plan (written instead of copying the source's files)."""
    del written  # the writer's digests cover exactly the files it wrote
    write_config(config_source, staging, out_dtype, config_updates)
    parents = ([base] if base else []) + models
    template = None
    if recipe.chat_template is not None:
        dirs = [p.path if p.path.is_dir() else p.path.parent for p in parents]
        template = output_chat_template(recipe, dirs)
    if tokenizer is not None:
        tokenizer_files = save_tokenizer(tokenizer, template, staging)
    elif template is not None and tokenizer_source is not None:
        # mergekit loads the source's tokenizer and writes it again with the template
        from transformers import AutoTokenizer

        src_dir = tokenizer_source if tokenizer_source.is_dir() else tokenizer_source.parent
        tokenizer_files = save_tokenizer(
            AutoTokenizer.from_pretrained(str(src_dir)), template, staging
        )
    else:
        tokenizer_files = copy_tokenizer(tokenizer_source, staging)
    if tokenizer_source is not None and not tokenizer_files and recipe.tokenizer_source:
        raise InputError(
            f"no tokenizer files found in {str(tokenizer_source)!r}", field="tokenizer_source"
        )
    title = recipe.output.name or f"{recipe.merge_method} merge"
    (staging / "README.md").write_text(
        model_card(recipe, parents + [a for _, a in adapters], title)
    )
    timings = dict(timings)
    timings["publish_s"] = time.perf_counter() - publish_started
    timings["total_s"] = time.perf_counter() - started
    manifest = Manifest(
        format=MANIFEST_FORMAT,
        kind="merge",
        name=title,
        method=recipe.merge_method,
        seed=seed,
        code_version=weightsmith.__version__,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        parents=[
            ManifestParent(
                role="base" if p is base else "model",
                reference=str(p.reference),
                pinned=str(p.pinned),
                revision=p.revision,
            )
            for p in parents
        ]
        + [
            ManifestParent(
                role="adapter",
                reference=str(a.reference),
                pinned=str(a.pinned),
                revision=a.revision,
                applied_to=str(to.reference),
            )
            for to, a in adapters
        ],
        recipe=recipe.model_dump(mode="json", exclude_none=True),
        tokenizer_files=tokenizer_files,
        notes=notes,
        timings={k: round(v, 4) for k, v in timings.items()},
        files=folder_files(staging, known=writer_digests),
    )
    return write_manifest(staging, manifest)
