"""MoE assembly (docs/moe.md): ``run_moe`` builds a Mixtral mixture of experts from dense
Llama/Mistral fine-tunes of one base, one tensor at a time; the routers' initial weights
(mergekit-moe's gate modes) are in ``router``."""

from workers.moe.engine import MoeResult, run_moe

__all__ = ["MoeResult", "run_moe"]
