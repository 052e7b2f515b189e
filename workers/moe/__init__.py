"""MoE assembly (docs/moe.md): ``run_moe`` builds a mixture of experts (Mixtral from
Llama/Mistral, Qwen2-MoE from Qwen2) from dense fine-tunes of one base, one tensor at a time;
the routers' initial weights (mergekit-moe's gate modes) are in ``router``."""

from workers.moe.engine import MoeResult, run_moe

__all__ = ["MoeResult", "run_moe"]
