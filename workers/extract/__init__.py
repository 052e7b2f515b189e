"""LoRA extraction (docs/extract-lora.md): ``run_extract_lora`` turns a fine-tune into a PEFT
LoRA adapter of its base, streaming one tensor at a time; the truncated SVD and the factor
split are in ``svd``."""

from workers.extract.engine import ExtractResult, run_extract_lora

__all__ = ["ExtractResult", "run_extract_lora"]
