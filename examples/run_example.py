"""End-to-end example: build a tiny Llama and two fine-tunes, merge them with TIES via the
CLI, then load the merged model with transformers and generate. Runs offline in seconds.

    python -m examples.run_example [--workdir .example]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent


def build_family(root: Path) -> None:
    """A random-init tiny Llama as the base and two perturbed copies as 'fine-tunes'."""
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    for i, name in enumerate(("math", "code")):
        g = torch.Generator().manual_seed(100 + i)
        tuned = LlamaForCausalLM(config)
        tuned.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        tuned.save_pretrained(root / name)


def prepare_workdir(description: str | None) -> Path:
    """Parse --workdir, empty it and build the tiny model family under <workdir>/models."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workdir", default=".example")
    args = parser.parse_args()
    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "models").mkdir(parents=True)
    print(f"building tiny checkpoints in {work / 'models'}")
    build_family(work / "models")
    return work


def main() -> int:
    work = prepare_workdir(__doc__)
    recipe = work / "ties.yaml"
    shutil.copyfile(HERE / "ties.yaml", recipe)
    out = work / "merged"
    cmd = [sys.executable, "-m", "weightsmith", "merge", str(recipe), "--out", str(out)]
    print("$ weightsmith merge", recipe, "--out", out)
    subprocess.run(cmd, check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    print(
        f"manifest: {len(manifest['files'])} files, seed {manifest['seed']}, "
        f"parents {[p['pinned'] for p in manifest['parents']]}"
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=5, do_sample=False)
    print("merged model generates:", ids.tolist()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
