"""Tokenizer plans (mergekit's tokenizer_source / tokenizer:): the output vocabulary, each
input's embedding and output-head rows aligned to it, the files and config written.

Expectations come from tests/support/reference_vocab.py (mergekit's rules re-implemented
token by token) and the merge formulas written out densely here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from schemas.recipe import RecipeError, parse_recipe
from tests.support.merge_cases import engine
from tests.support.reference_merge import load_checkpoint
from tests.support.reference_vocab import expected_rows
from workers.errors import InputError
from workers.merge.engine import run_merge

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _vocab(d: Path) -> dict[str, int]:
    return dict(AutoTokenizer.from_pretrained(str(d)).get_vocab())


@pytest.fixture(scope="module")
def fam(llama_family, llama_alt_tokenizer, llama_small_vocab):
    return {**llama_family, "alt": llama_alt_tokenizer, "small": llama_small_vocab}


def _task_arithmetic(r, fam, names, weights, out_vocab, rows, tokens=None, tok_names=None):
    """The expected output: base + Σ wᵢ (xᵢ − base) on the aligned rows for the vocabulary
    tensors, on the stored tensors elsewhere."""
    ck = {n: load_checkpoint(fam[n]) for n in ["base", *names]}
    order = [*names, "base"]  # mergekit's order: the models, then the unlisted base
    expected = {}
    for t in ck["base"]:
        if t in VOCAB_TENSORS:
            al = expected_rows(
                out_vocab,
                rows,
                [(n, _vocab(fam[n]), ck[n][t].float()) for n in order],
                base="base",
                tokens=tokens,
            )
        else:
            al = {n: ck[n][t].float() for n in order}
        expected[t] = al["base"] + sum(
            w * (al[n] - al["base"]) for n, w in zip(names, weights, strict=True)
        )
    return expected


def _ta_recipe(fam, names, weights, **extra):
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(fam["base"]),
        "models": [
            {"model": str(fam[n]), "parameters": {"weight": w}}
            for n, w in zip(names, weights, strict=True)
        ],
        **extra,
    }


def _assert_close(out, expected):
    assert set(out) == set(expected)
    for t in expected:
        assert out[t].shape == expected[t].shape, t
        torch.testing.assert_close(
            out[t].float(), expected[t], **TOL, msg=lambda m, t=t: f"{t}: {m}"
        )


def test_union_of_vocabularies_aligns_every_input(fam, tmp_path):
    r = _ta_recipe(fam, ["ft1", "alt"], [0.5, 0.3], tokenizer_source="union")
    _, out = engine(r, tmp_path / "out")
    vocab = _vocab(tmp_path / "out")
    base_v, alt_v = _vocab(fam["base"]), _vocab(fam["alt"])
    assert set(vocab) == set(base_v) | set(alt_v)
    assert all(vocab[t] == i for t, i in base_v.items())  # the base's ids are kept
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == len(vocab)
    _assert_close(out, _task_arithmetic(r, fam, ["ft1", "alt"], [0.5, 0.3], vocab, len(vocab)))


def test_vocabularies_of_different_sizes_merge_with_the_mean_of_shared_rows(fam, tmp_path):
    # linear, no base: a token two of three models have gets the mean of their rows
    names = ["ft1", "ft2", "small"]  # the w-tokens: in ft1 and ft2 only
    r = {
        "merge_method": "linear",
        "models": [
            {"model": str(fam[n]), "parameters": {"weight": w}}
            for n, w in zip(names, [0.5, 0.3, 0.2], strict=True)
        ],
        "tokenizer": {"source": "union", "pad_to_multiple_of": 100},
    }
    _, out = engine(r, tmp_path / "out")
    vocab = _vocab(tmp_path / "out")
    rows = -(-len(vocab) // 100) * 100
    assert rows > len(vocab)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["vocab_size"] == rows
    ck = {n: load_checkpoint(fam[n]) for n in names}
    for t in VOCAB_TENSORS:
        al = expected_rows(vocab, rows, [(n, _vocab(fam[n]), ck[n][t].float()) for n in names])
        want = sum(w * al[n] for n, w in zip(names, [0.5, 0.3, 0.2], strict=True))
        torch.testing.assert_close(out[t], want, **TOL)
    # the model loads with its new vocabulary and the tokenizer encodes the union's tokens
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.get_input_embeddings().weight.shape[0] == rows
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok("w1 v2x5")["input_ids"] == [vocab["w1"], vocab["v2x5"]]


def test_listed_tokens_zero_model_token_and_force(fam, tmp_path):
    tokens = {
        "<new>": {"source": {"kind": "model_token", "model": str(fam["alt"]), "token": "v1x7"}},
        "<z>": {"source": {"kind": "zero"}},
        "w3": {"source": str(fam["ft1"])},
        "w4": {
            "source": {"kind": "model_token", "model": str(fam["ft1"]), "token_id": 9},
            "force": True,
        },
    }
    r = _ta_recipe(
        fam,
        ["ft1", "alt"],
        [0.5, 0.3],
        tokenizer={"source": "base", "tokens": tokens, "pad_to_multiple_of": 8},
    )
    _, out = engine(r, tmp_path / "out")
    vocab = _vocab(tmp_path / "out")
    base_v = _vocab(fam["base"])
    assert set(vocab) == set(base_v) | {"<new>", "<z>"}
    names = {str(fam[n]): n for n in ("ft1", "alt")}
    ref_tokens = {
        tok: {
            **cfg,
            "source": (
                {**cfg["source"], "model": names[cfg["source"]["model"]]}
                if isinstance(cfg["source"], dict) and "model" in cfg["source"]
                else names.get(cfg["source"], cfg["source"])
                if isinstance(cfg["source"], str)
                else cfg["source"]
            ),
        }
        for tok, cfg in tokens.items()
    }
    rows = -(-len(vocab) // 8) * 8
    expected = _task_arithmetic(r, fam, ["ft1", "alt"], [0.5, 0.3], vocab, rows, ref_tokens)
    _assert_close(out, expected)
    # the zero token is zero in every input, so in the merge; the forced one is ft1's row 9
    # in every input, so the merge keeps it
    emb = out["model.embed_tokens.weight"]
    assert torch.count_nonzero(emb[vocab["<z>"]]) == 0
    torch.testing.assert_close(
        emb[vocab["w4"]], load_checkpoint(fam["ft1"])["model.embed_tokens.weight"][9], **TOL
    )
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok("w1 <new>")["input_ids"] == [vocab["w1"], vocab["<new>"]]


def test_a_model_as_tokenizer_source_takes_its_vocabulary(fam, tmp_path):
    r = _ta_recipe(fam, ["ft1", "alt"], [0.5, 0.3], tokenizer_source=str(fam["alt"]))
    _, out = engine(r, tmp_path / "out")
    vocab = _vocab(tmp_path / "out")
    assert vocab == _vocab(fam["alt"])
    _assert_close(out, _task_arithmetic(r, fam, ["ft1", "alt"], [0.5, 0.3], vocab, len(vocab)))


def test_chat_template_jinja_and_auto(fam, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    r = _ta_recipe(fam, ["ft1"], [0.5], chat_template=template)
    engine(r, tmp_path / "jinja")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "jinja"))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "[user] hi\n"
    # auto: no input has a template, so none is written (as mergekit)
    engine({**r, "chat_template": "auto", "tokenizer_source": "union"}, tmp_path / "auto")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "auto")).chat_template is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("chatml", "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                   "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>assistant\n"),
        ("llama3", "{bos}<|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        ("mistral", "{bos}[INST] be brief\n\nhi [/INST]hello{eos}"),
        ("alpaca", "be brief\n\n### Instruction:\nhi\n\n### Response:\nhello{eos}\n\n"
                   "### Response:\n"),
    ],
)  # fmt: skip
def test_a_named_chat_template_is_written_and_renders_its_format(fam, tmp_path, name, expected):
    r = _ta_recipe(fam, ["ft1"], [0.5], chat_template=name)
    engine(r, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == expected.format(bos=tok.bos_token, eos=tok.eos_token)


# -- bad recipes and inputs ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"tokenizer_source": "base", "tokenizer": {"source": "base"}},
            "tokenizer: set either 'tokenizer_source' or 'tokenizer'",
        ),
        (
            {"tokenizer": {"tokens": {"<x>": {"source": "org/other"}}}},
            "tokenizer.tokens.<x>.source: 'org/other' is not an input of the merge",
        ),
        (
            {"tokenizer": {"tokens": {"<x>": {"force": True}}}},
            "tokenizer.tokens.<x>.force: a forced token needs a 'source'",
        ),
        (
            {
                "tokenizer": {
                    "tokens": {"<x>": {"source": {"kind": "model_token", "model": "org/a"}}}
                }
            },
            "tokenizer.tokens.<x>.source: give exactly one of 'token'",
        ),
        ({"tokenizer": {"pad_to_multiple_of": 0}}, "tokenizer.pad_to_multiple_of"),
        ({"tokenizer": {"source": "org/a+org/l"}}, "tokenizer.source: a LoRA adapter"),
        ({"chat_template": "exaone"}, "chat_template: the named template 'exaone' is not one"),
        ({"chat_template": "hello"}, "chat_template: a chat template is 'auto'"),
    ],
)
def test_bad_tokenizer_settings_name_the_field(extra, message):
    r = {
        "merge_method": "task_arithmetic",
        "base_model": "org/base",
        "models": [{"model": "org/a"}],
        **extra,
    }
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("+", r"\+")):
        parse_recipe(r)


def test_model_token_missing_from_the_model_names_the_field(fam, tmp_path):
    tokens = {
        "<new>": {
            "source": {"kind": "model_token", "model": str(fam["ft1"]), "token": "not-a-token"}
        }
    }
    r = _ta_recipe(fam, ["ft1"], [0.5], tokenizer={"source": "base", "tokens": tokens})
    with pytest.raises(InputError, match="'not-a-token' is not in the tokenizer") as e:
        run_merge(parse_recipe(r), tmp_path / "out")
    assert e.value.field == "tokenizer.tokens.<new>.source.token"


def test_token_from_a_model_lacking_it_names_the_field(fam, tmp_path):
    tokens = {"w3": {"source": str(fam["alt"])}}  # alt's vocabulary has no w3
    r = _ta_recipe(fam, ["ft1", "alt"], [0.5, 0.5], tokenizer={"source": "base", "tokens": tokens})
    with pytest.raises(InputError, match="'w3' is not in the vocabulary") as e:
        run_merge(parse_recipe(r), tmp_path / "out")
    assert e.value.field == "tokenizer.tokens.w3.source"


def test_different_vocabulary_sizes_need_a_tokenizer_plan(fam, tmp_path):
    r = _ta_recipe(fam, ["ft1", "small"], [0.5, 0.5])
    with pytest.raises(InputError, match="set 'tokenizer_source'"):
        run_merge(parse_recipe(r), tmp_path / "out")


def test_a_long_chat_template_passes_the_body_walk_but_not_past_its_own_limit():
    from schemas.limits import MAX_CHAT_TEMPLATE_CHARS, DocumentRefused, check_document

    template = "{{ messages[0]['content'] }}" + " " * 10_000
    check_document({"recipe": {"chat_template": template}})  # past 4096: allowed here
    with pytest.raises(DocumentRefused) as info:
        check_document({"recipe": {"name": template}})
    assert info.value.pointer == "/recipe/name"
    with pytest.raises(DocumentRefused):
        check_document({"chat_template": "{" + " " * MAX_CHAT_TEMPLATE_CHARS})
    r = {"merge_method": "linear", "models": [{"model": "org/a"}], "chat_template": template}
    assert parse_recipe(r).chat_template == template
