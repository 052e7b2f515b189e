"""Real PEFT LoRA adapters for the tiny models of testbed/tiny_models.py, and PEFT's own
merge of them (``merge_and_unload``): the independent expectation of ``BASE+ADAPTER``.

Adapters are made with ``peft.get_peft_model`` and saved with ``save_pretrained``, exactly
as users publish them. ``init_lora_weights=False`` draws A and B at random (PEFT's default
makes B zero, so ΔW would be zero and prove nothing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The base with the adapter merged by PEFT itself (``merge_and_unload``), as the tensors
    ``save_pretrained`` would write (tied weights once, under the checkpoint's names)."""
    model = AutoModelForCausalLM.from_pretrained(str(base))
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    state = merged.state_dict()
    on_disk = load_file(str(base / "model.safetensors"))
    return {name: state[name].detach().clone() for name in on_disk}


def edit_adapter_config(adapter: Path, **changes: Any) -> None:
    """Change fields of the adapter's adapter_config.json (None removes one)."""
    path = adapter / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def rename_adapter_tensors(adapter: Path, renames: dict[str, str | None]) -> None:
    """Rename adapter tensors: each key containing ``old`` gets it replaced by ``new`` (None
    drops the tensor)."""
    path = adapter / ADAPTER_WEIGHTS
    tensors = load_file(str(path))
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        new: str | None = key
        for old, repl in renames.items():
            if new is not None and old in new:
                new = None if repl is None else new.replace(old, repl)
        if new is not None:
            out[new] = t
    save_file(out, str(path))


def replace_adapter_tensor(adapter: Path, key_part: str, tensor: torch.Tensor) -> str:
    """Put ``tensor`` in place of the first adapter tensor whose key contains ``key_part``;
    the key."""
    path = adapter / ADAPTER_WEIGHTS
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if key_part in k)
    tensors[key] = tensor
    save_file(tensors, str(path))
    return key
