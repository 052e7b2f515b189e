"""The examples' models: a tiny Llama that has learned one sentence, and two "fine-tunes" of
it (the base plus seeded noise), each saved with its word-level tokenizer. Built in seconds
on a CPU, offline, the same on every run (seeded).

The base is trained so that the merged model's output can be read: a sound merge of two
small perturbations of it still completes the sentence, and a broken one would not.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SENTENCE = "weightsmith merges fine-tuned models one tensor at a time and checks every byte"
PROMPT = "weightsmith merges"
SPECIALS = ["<unk>", "<s>", "</s>"]
TRAIN_STEPS = 60
FINE_TUNE_NOISE = 0.005  # std of the noise added to every weight of each fine-tune


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the sentence's words (whitespace splits them)."""
    words = list(dict.fromkeys(SENTENCE.split()))
    vocab = {token: i for i, token in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def build_family(root: Path) -> None:
    """``root/base`` (trained on the sentence), ``root/math`` and ``root/code`` (the base plus
    noise), each a safetensors checkpoint with config and tokenizer."""
    tok = tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    ids = torch.tensor([[tok.bos_token_id, *tok.encode(SENTENCE), tok.eos_token_id]])
    optimizer = torch.optim.Adam(base.parameters(), lr=1e-2)
    base.train()
    for _ in range(TRAIN_STEPS):
        optimizer.zero_grad()
        base(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    base.eval()
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for i, name in enumerate(("math", "code")):
        g = torch.Generator().manual_seed(100 + i)
        tuned = LlamaForCausalLM(config)
        tuned.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(torch.randn(p.shape, generator=g) * FINE_TUNE_NOISE)
        tuned.save_pretrained(root / name)
        tok.save_pretrained(root / name)


def continue_text(model_dir: Path, prompt: str = PROMPT, new_tokens: int = 12) -> str:
    """The model's greedy continuation of ``prompt``, decoded with its own tokenizer."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[tok.bos_token_id, *tok.encode(prompt)]])
    out = model.generate(
        ids,
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def prepare_workdir(description: str | None) -> Path:
    """Parse --workdir, empty it and build the tiny model family under <workdir>/models."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workdir", default=".example", help="where the example writes")
    args = parser.parse_args()
    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "models").mkdir(parents=True)
    print(f"building tiny checkpoints in {work / 'models'} (a base that knows one sentence)")
    build_family(work / "models")
    return work
