"""The v* optimisation runs each prompt from its subject token on, after a cached prefix.
Checked against the plain whole-sequence forward (the simple implementation): the same
log-probabilities, gradients and module outputs, on Llama and GPT-2, with subjects at
position 0, ragged prefixes and ragged suffixes."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from testbed.tiny_models import PAD_ID, VOCAB_SIZE, gpt2_config, llama_config
from workers.edit.prompts import Prompt, collate, split_at_subject
from workers.edit.tracing import add_to_output, log_probs_at, module_io, prefix_cache

# (length, subject position, target positions): ragged on both sides of the subject
SHAPES = [
    (9, 4, (6, 7, 8)),
    (5, 0, (3, 4)),  # subject is the first token: empty prefix
    (12, 9, (10, 11)),
    (7, 2, (6,)),
]


def _model(kind: str) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(llama_config(num_hidden_layers=3))
        module = "model.layers.1.mlp.down_proj"
    else:
        model = GPT2LMHeadModel(gpt2_config())
        module = "transformer.h.1.mlp.c_proj"
    return model.eval(), module


def _batch() -> tuple[list[Prompt], torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    prompts = []
    for length, subj, targets in SHAPES:
        ids = torch.randint(3, VOCAB_SIZE, (length,), generator=g).tolist()
        labels = tuple(torch.randint(3, VOCAB_SIZE, (len(targets),), generator=g).tolist())
        prompts.append(Prompt(ids=ids, subject_pos=subj, target_pos=targets, target_ids=labels))
    batch = collate(prompts, PAD_ID)
    rows, pos, labels = batch.target_index()
    return prompts, rows, pos, labels


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("loss_layer", [None, 1])
def test_split_forward_equals_the_whole_sequence(kind, loss_layer):
    model, module = _model(kind)
    prompts, rows, pos, labels = _batch()
    batch = collate(prompts, PAD_ID)
    split = split_at_subject(batch, PAD_ID)
    assert split.prefix_len.tolist() == [s for _, s, _ in SHAPES]
    d_out = model.get_submodule(module).weight.shape[1 if kind == "gpt2" else 0]
    for p in model.parameters():
        p.requires_grad_(False)

    def loss_and_grad(whole: bool) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(2)
        delta = (0.5 * torch.randn(d_out, generator=g)).requires_grad_()
        if whole:
            with add_to_output(model, module, batch.rows, batch.subject_pos, delta):
                lp = log_probs_at(model, batch, rows, pos, loss_layer=loss_layer)
        else:
            prefix = prefix_cache(model, split)
            at = torch.zeros(len(prompts), dtype=torch.long)
            with add_to_output(model, module, batch.rows, at, delta):
                lp = log_probs_at(
                    model, split, rows, pos - split.prefix_len[rows],
                    loss_layer=loss_layer, prefix=prefix,
                )  # fmt: skip
        picked = lp.gather(1, labels[:, None])
        picked.sum().backward()
        assert delta.grad is not None
        return lp.detach(), delta.grad

    lp_whole, grad_whole = loss_and_grad(True)
    lp_split, grad_split = loss_and_grad(False)
    assert torch.isfinite(lp_split).all()
    torch.testing.assert_close(lp_split, lp_whole, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(grad_split, grad_whole, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_module_io_after_a_cached_prefix_equals_the_whole_sequence(kind):
    model, module = _model(kind)
    prompts, *_ = _batch()
    batch = collate(prompts, PAD_ID)
    split = split_at_subject(batch, PAD_ID)
    k_whole, v_whole = module_io(model, module, batch, batch.rows, batch.subject_pos)
    zeros = torch.zeros(len(prompts), dtype=torch.long)
    prefix = prefix_cache(model, split)
    k_split, v_split = module_io(model, module, split, batch.rows, zeros, prefix=prefix)
    torch.testing.assert_close(k_split, k_whole, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(v_split, v_whole, atol=2e-5, rtol=1e-5)
    # the cache is copied, not consumed: a second use gives the same
    _, again = module_io(model, module, split, batch.rows, zeros, prefix=prefix)
    torch.testing.assert_close(again, v_split)


def test_a_batch_whose_subjects_all_open_the_prompt_has_no_prefix():
    model, module = _model("llama")
    prompts = [Prompt(ids=[5, 6, 7], subject_pos=0), Prompt(ids=[8, 9], subject_pos=0)]
    batch = collate(prompts, PAD_ID)
    split = split_at_subject(batch, PAD_ID)
    assert prefix_cache(model, split) is None
    zeros = torch.zeros(2, dtype=torch.long)
    _, whole = module_io(model, module, batch, batch.rows, zeros)
    _, alone = module_io(model, module, split, batch.rows, zeros)
    torch.testing.assert_close(alone, whole)


def test_memit_batched_keys_equal_each_request_read_alone():
    """keys_and_outputs (requests batched, ragged) against rome.subject_keys, one request
    at a time."""
    from schemas.edit_recipe import EditRequest
    from testbed.tiny_models import build_tokenizer
    from workers.edit.memit import keys_and_outputs
    from workers.edit.rome import subject_keys

    model, module = _model("llama")
    tok = build_tokenizer()
    templates = ["{}", "w9 w10 . {}", "w11 . {}"]
    requests = [
        EditRequest(prompt="w5 w6 w7 w8", subject="w6", target_new="w20"),
        EditRequest(prompt="w30 w31", subject="w30", target_new="w21"),
        EditRequest(prompt="w40 w41 w42 w43 w44 w45", subject="w42 w43", target_new="w22"),
    ]
    block = "model.layers.2"
    K, Z = keys_and_outputs(model, tok, module, block, templates, requests)
    for j, r in enumerate(requests):
        keys = subject_keys(model, tok, module, templates, r.prompt, r.subject)
        outs = subject_keys(model, tok, block, templates, r.prompt, r.subject)
        torch.testing.assert_close(K[:, j], keys.k_bar, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(Z[:, j], outs.w_k_bar, atol=2e-5, rtol=1e-5)
