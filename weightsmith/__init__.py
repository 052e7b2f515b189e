"""weightsmith: merge and patch LLM checkpoints (CLI and shared entry points)."""

__version__ = "0.1.0"
