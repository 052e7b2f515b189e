#!/usr/bin/env python3
"""Merge benchmark: weightsmith vs mergekit 0.1.5 vs an I/O floor, on synthetic Llama checkpoints.

Run it with the project's virtualenv (it needs torch and safetensors to build the models):

    . .venv/bin/activate
    python bench/merge_bench.py                     # ~1 GB fp16 base + 3 fine-tunes
    python bench/merge_bench.py --size-gb 0.05      # quick
    python bench/merge_bench.py --methods ties --skip-mergekit
    python bench/merge_bench.py --size-gb 0.05 --compat     # only the compatibility check
    python bench/merge_bench.py --preset 3b --finetunes 2 --methods task_arithmetic,ties \
        --skip-floor --skip-compat                # Llama-3.2-3B shapes, base + 2 fine-tunes
    python bench/merge_bench.py --device cuda --methods linear,ties,dare_ties,pcb  # on a GPU

What it does, in order:

1. builds (or reuses) a base model and three fine-tunes (base + N(0, 0.01*std) deltas) with a
   Llama layout, written with ``safetensors.torch.save_file``, sharded at ~2 GB, cached under
   ``bench/.data/models/``;
2. creates ``bench/.venv-mergekit`` (torch==2.13.0 first, then mergekit==0.1.5) unless it exists
   or ``--skip-mergekit`` is given;
3. reads every input file once (warm-up), so that every contender below sees warm page caches;
4. runs the I/O floor: a child that reads every input tensor of every model, one tensor at a time,
   with plain file reads into one buffer, and writes the base's tensors back out once, fsynced;
5. for each method runs ``weightsmith merge RECIPE --out DIR`` and ``mergekit-yaml RECIPE DIR``
   and measures each child's wall time, input throughput, peak RSS (``os.wait4``) and bytes read
   and written (its ``/proc/<pid>/io``, read after it exits and before it is reaped); with
   ``--repeats N`` ours runs N times in a row and the run of the median wall is kept (the
   ratios to linear's wall then compare medians: linear's own wall varies by a third from
   run to run on a small shared machine);
6. compares our output tensors with mergekit's (max |diff|, one tensor at a time);
7. prints a table and writes it as JSON to ``bench/.data/results-merge.json``;
8. unless ``--skip-compat``: the compatibility check, on the small (0.05 GB) family: each method
   both tools have and that draws nothing at random (linear, task_arithmetic, ties, breadcrumbs,
   breadcrumbs_ties, slerp, model_stock) run by both with ``dtype``/``out_dtype`` float32, and
   compared position by position, over all positions and away from "tie positions" (where a
   model's |τ| equals its top-k / rank boundary, so that the tools' different ordering of
   equal magnitudes decides what is kept). Away from them the results must agree to float32
   rounding; at them each tool's value must be the merge for some keep/drop choice of the tied
   entries (re-computed in float64). Own table; in the JSON under "compat". ``--compat`` runs
   only this check (results in ``bench/.data/results-compat.json``; exit 1 on a mismatch).

With ``--device cuda`` (or ``cuda:N``; it needs a CUDA build of torch in the project's
virtualenv) our merges run with ``--device`` on that GPU through a child that reports the
peak GPU memory (``torch.cuda.max_memory_allocated``), a second floor runs beside the I/O
floor (the same reads through pinned buffers onto the GPU and the base's tensors back, so
the transfers are in it) and each method is compared with both; mergekit and the
compatibility check (CPU-only here) are skipped.

Every measured wall time includes an ``os.sync()`` right after the child exits (the page cache is
flushed before each child starts), so each figure is "until the output is on disk", the same
thing the I/O floor measures with its fsync.

The main process imports only the standard library and does the heavy work (model generation,
tensor comparison) in child processes: on Linux a child's ``ru_maxrss`` also counts the RSS of
the process it was forked from, so a lean parent keeps the RSS figures honest. The baseline that
remains (what spawning ``/bin/true`` from here reports) is printed with the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = BENCH_DIR / ".data"
DEFAULT_MERGEKIT_VENV = BENCH_DIR / ".venv-mergekit"
THIS = Path(__file__).resolve()

TORCH_PIN = "torch==2.13.0"
MERGEKIT_PIN = "mergekit==0.1.5"

GB = 1_000_000_000
MIB = 1024 * 1024
SHARD_BYTES = 2 * GB  # input shards, like HF's "2GB"
MERGEKIT_OUT_SHARD = "1B"  # parameters per output shard: 2 GB of fp16, like the inputs
N_FINETUNES = 3  # default of --finetunes; the compatibility check always uses 3
GEN_VERSION = 1  # bump when the generator changes, so cached models are rebuilt

CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}

# Recipes: per-model parameters, shared parameters. "mergekit": whether mergekit 0.1.5 has it.
# "method": the merge_method when the key is not one (a variant's settings under its own key).
RECIPES: dict[str, dict[str, Any]] = {
    # the streaming floor of the sparsifying methods (issue 18): the same inputs, element-wise
    # (the unlisted base_model is merged as a fourth model, so one weight for all four)
    "linear": {"model": {}, "shared": {"weight": 1.0}, "mergekit": True},
    "task_arithmetic": {"model": {"weight": 0.3}, "shared": {}, "mergekit": True},
    "ties": {"model": {"density": 0.5, "weight": 1.0}, "shared": {}, "mergekit": True},
    # the TIES paper's top-k over the whole model (two statistics passes; not in mergekit)
    "ties_global": {
        "method": "ties",
        "model": {"density": 0.5, "weight": 1.0},
        "shared": {"scope": "global"},
        "mergekit": False,
    },
    "breadcrumbs": {
        "model": {"density": 0.9, "gamma": 0.01, "weight": 0.3},
        "shared": {},
        "mergekit": True,
    },
    "breadcrumbs_ties": {
        "model": {"density": 0.9, "gamma": 0.01, "weight": 0.3},
        "shared": {},
        "mergekit": True,
    },
    "dare_ties": {"model": {"density": 0.5, "weight": 1.0}, "shared": {}, "mergekit": True},
    "dare_linear": {"model": {"density": 0.5, "weight": 0.3}, "shared": {}, "mergekit": True},
    "della": {
        "model": {"density": 0.5, "epsilon": 0.1, "weight": 1.0},
        "shared": {},
        "mergekit": True,
    },
    # weightsmith's pcb takes density as a shared (top-level) parameter
    "pcb": {"model": {"weight": 1.0}, "shared": {"density": 0.1}, "mergekit": False},
    # layer slices: the LazyMergekit slerp template over base and ft1, every layer …
    "slerp_slices": {
        "method": "slerp",
        "slices": "two_models_all_layers",
        "shared": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
        "mergekit": True,
    },
    # … and a depth up-scaling frankenmerge: base layers [0, 3L/4) then ft1's [L/4, L)
    "passthrough_slices": {
        "method": "passthrough",
        "slices": "depth_up_scaling",
        "shared": {},
        "mergekit": True,
    },
}
DEFAULT_METHODS = "task_arithmetic,ties,breadcrumbs,pcb"

# Compatibility check (--compat; by default also after a normal run, on COMPAT_SIZE_GB models):
# both tools compute in float32 and write float32, so the only differences left are float32
# rounding and the order in which tied |τ| are ranked. Inputs are indices into
# [base, ft1, ft2, ...]; "base" is the recipe's base_model (None: no base_model; the change
# is then measured from the generated base). Per-model parameters differ between the models,
# so that a parameter applied to the wrong model would show. "selection": how the method picks
# entries by |τ| ("topk": TIES' k largest; "ranks": Breadcrumbs' ascending ranks), for the
# tie exclusion; "consensus" (sign election) and "normalize" (the method's default in both
# tools) for the float64 re-computation at tie positions.
COMPAT_SIZE_GB = 0.05
COMPAT_ULP_TOL = 4.0  # |ours - mk| in float32 ulps of the largest operand at that position
COMPAT_RECIPES: dict[str, dict[str, Any]] = {
    "linear": {
        "base": None,
        "models": [(1, {"weight": 0.5}), (2, {"weight": 0.3}), (3, {"weight": 0.2})],
        "shared": {},
        "selection": None,
    },
    "task_arithmetic": {
        "base": 0,
        "models": [(1, {"weight": 0.5}), (2, {"weight": 0.3}), (3, {"weight": 0.2})],
        "shared": {"lambda": 0.8},
        "selection": None,
    },
    "ties": {
        "base": 0,
        "models": [
            (1, {"density": 0.5, "weight": 1.0}),
            (2, {"density": 0.3, "weight": 0.7}),
            (3, {"density": 0.7, "weight": 0.4}),
        ],
        "shared": {},
        "selection": "topk",
        "consensus": True,
        "normalize": True,
    },
    "breadcrumbs": {
        "base": 0,
        "models": [
            (1, {"density": 0.9, "gamma": 0.01, "weight": 0.3}),
            (2, {"density": 0.8, "gamma": 0.05, "weight": 0.5}),
            (3, {"density": 0.6, "gamma": 0.02, "weight": 0.2}),
        ],
        "shared": {},
        "selection": "ranks",
        "consensus": False,
        "normalize": False,
    },
    "breadcrumbs_ties": {
        "base": 0,
        "models": [
            (1, {"density": 0.9, "gamma": 0.01, "weight": 0.3}),
            (2, {"density": 0.8, "gamma": 0.05, "weight": 0.5}),
            (3, {"density": 0.6, "gamma": 0.02, "weight": 0.2}),
        ],
        "shared": {},
        "selection": "ranks",
        "consensus": True,
        "normalize": False,
    },
    # base and ft1 are nearly collinear (cos ~ 0.99995 > 0.9995): both tools take the lerp branch
    "slerp": {"base": 0, "models": [(0, {}), (1, {})], "shared": {"t": 0.3}, "selection": None},
    # Around the generated base the synthetic task vectors are independent noise (mean cosine
    # ~0, t < 0 for half the tensors: we clamp t to [0, 1], mergekit doesn't). Around ft1 they
    # share -noise1 (cosines ~0.5-0.7, t ~0.84), which tests the formula itself.
    "model_stock": {
        "base": 1,
        "models": [(0, {}), (2, {}), (3, {})],
        "shared": {},
        "selection": None,
    },
}
DEFAULT_COMPAT_METHODS = ",".join(COMPAT_RECIPES)

# Targets from the issue, printed as information (never asserted).
SPEED_TARGETS = {"ties": 1.5, "breadcrumbs": 1.5, "task_arithmetic": 1.0}  # x mergekit's speed
FLOOR_TARGETS = {"task_arithmetic": 1.5}  # ours / I/O floor
DEVICE_FLOOR_TARGET = 1.5  # on a GPU: every method's wall / that machine's I/O floor
# issue 18 item 1: ours / linear's wall in the same run (``--methods`` must include linear)
LINEAR_TARGETS = {
    "ties": 2.0,
    "ties_global": 2.0,
    "breadcrumbs": 2.0,
    "breadcrumbs_ties": 2.0,
    "dare_ties": 2.0,
    "dare_linear": 2.0,
    "della": 2.0,
    "pcb": 4.0,
}
RSS_BUDGET_MIB = 1024  # + a few (we allow 4) of the largest input tensor


# --------------------------------------------------------------------------------------------
# Synthetic Llama layout
# --------------------------------------------------------------------------------------------

# (hidden, intermediate, heads, kv_heads, vocab): Llama-like widths, smallest first.
TIERS = [
    (256, 688, 4, 2, 4096),
    (512, 1408, 8, 4, 8192),
    (1024, 2816, 16, 4, 16384),
    (2048, 5632, 32, 4, 32000),
    (4096, 11008, 32, 8, 32000),
    (8192, 28672, 64, 8, 32000),
]


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    layers: int
    tied_embeddings: bool = False  # no lm_head tensor: the head is the embedding

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# Shapes of real checkpoints (--preset): all tensor shapes as in the model's config.json.
# "3b": meta-llama/Llama-3.2-3B (config.json on the Hugging Face Hub: hidden_size 3072,
# intermediate_size 8192, num_hidden_layers 28, num_attention_heads 24, num_key_value_heads 8,
# head_dim 128, vocab_size 128256, tie_word_embeddings true): 3,212,749,824 parameters
# (the model card's "3.21B"), 6.43 GB in fp16.
PRESETS: dict[str, Shape] = {
    "3b": Shape(3072, 8192, 24, 8, 128256, 28, tied_embeddings=True),
}


def shape_key(shape: Shape) -> dict[str, Any]:
    """The shape in a cached model's key (untied shapes as before the field existed, so
    that their caches stay valid)."""
    key = asdict(shape)
    if not shape.tied_embeddings:
        del key["tied_embeddings"]
    return key


def choose_shape(size_gb: float, width_of_gb: float | None = None) -> Shape:
    """The widest tier whose embeddings + lm_head take at most 35% of the size (or of
    ``width_of_gb``: same tensor shapes, more layers, to show memory does not grow with the
    model); then enough layers to get closest to the size."""
    target = size_gb * GB
    width_target = (width_of_gb or size_gb) * GB
    chosen = TIERS[0]
    for tier in TIERS:
        hidden, _inter, _h, _kv, vocab = tier
        if 2 * vocab * hidden * 2 <= 0.35 * width_target:
            chosen = tier
    hidden, inter, heads, kv, vocab = chosen
    probe = Shape(hidden, inter, heads, kv, vocab, 1)
    per_layer = sum(_numel(s) for n, s, _ in tensor_specs(probe) if ".layers.0." in n) * 2
    fixed = sum(_numel(s) for n, s, _ in tensor_specs(probe) if ".layers." not in n) * 2
    layers = max(1, round((target - fixed) / per_layer))
    return Shape(hidden, inter, heads, kv, vocab, layers)


def tensor_specs(shape: Shape) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) in HF save order; kind is "linear", "embed" or "norm"."""
    h, i, kvd = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    specs: list[tuple[str, tuple[int, ...], str]] = [
        ("model.embed_tokens.weight", (shape.vocab, h), "embed")
    ]
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        specs += [
            (p + "self_attn.q_proj.weight", (h, h), "linear"),
            (p + "self_attn.k_proj.weight", (kvd, h), "linear"),
            (p + "self_attn.v_proj.weight", (kvd, h), "linear"),
            (p + "self_attn.o_proj.weight", (h, h), "linear"),
            (p + "mlp.gate_proj.weight", (i, h), "linear"),
            (p + "mlp.up_proj.weight", (i, h), "linear"),
            (p + "mlp.down_proj.weight", (h, i), "linear"),
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "post_attention_layernorm.weight", (h,), "norm"),
        ]
    specs.append(("model.norm.weight", (h,), "norm"))
    if not shape.tied_embeddings:
        specs.append(("lm_head.weight", (shape.vocab, h), "embed"))
    return specs


def _numel(dims: tuple[int, ...]) -> int:
    return math.prod(dims)


def llama_config(shape: Shape) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": shape.tied_embeddings,
        "torch_dtype": "float16",
        "use_cache": True,
    }


def plan_shards(specs: list[tuple[str, tuple[int, ...], str]], shard_bytes: int) -> list[list[int]]:
    """Greedy HF-style sharding: indices of specs per shard (fp16 sizes)."""
    shards: list[list[int]] = [[]]
    used = 0
    for idx, (_name, dims, _kind) in enumerate(specs):
        nbytes = _numel(dims) * 2
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(idx)
        used += nbytes
    return shards


# --------------------------------------------------------------------------------------------
# Child: model generation (imports torch; runs in its own process)
# --------------------------------------------------------------------------------------------

STD = {"linear": 0.02, "embed": 0.02, "norm": 0.05}  # base: N(0, std); norms: 1 + N(0, std)
DELTA_REL = 0.01  # fine-tune delta: N(0, DELTA_REL * rms(base tensor))


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def child_generate(spec_path: str) -> int:
    import torch
    from safetensors.torch import save_file

    torch.set_grad_enabled(False)
    spec = json.loads(Path(spec_path).read_text())
    shape = Shape(**spec["shape"])
    out = Path(spec["out"])
    index = spec["index"]  # 0 = base, k = fine-tune k
    seed = spec["seed"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def base_tensor(name: str, dims: tuple[int, ...], kind: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(_seed(seed, "base", name))
        t = torch.randn(dims, generator=g, dtype=torch.float32).mul_(STD[kind])
        if kind == "norm":
            t.add_(1.0)
        return t.to(torch.float16)

    specs = tensor_specs(shape)
    shards = plan_shards(specs, spec["shard_bytes"])
    weight_map: dict[str, str] = {}
    total = 0
    for s, idxs in enumerate(shards):
        fname = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors: dict[str, torch.Tensor] = {}
        for idx in idxs:
            name, dims, kind = specs[idx]
            t = base_tensor(name, dims, kind)
            if index > 0:
                rms = STD[kind] if kind != "norm" else 1.0
                g = torch.Generator().manual_seed(_seed(seed, "ft", index, name))
                noise = torch.randn(dims, generator=g, dtype=torch.float32)
                t = noise.mul_(DELTA_REL * rms).add_(t.float()).to(torch.float16)
                del noise
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))
    (tmp / "config.json").write_text(json.dumps(llama_config(shape), indent=2) + "\n")
    (tmp / ".synth.json").write_text(json.dumps(spec["key"], sort_keys=True))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return 0


# --------------------------------------------------------------------------------------------
# Child: I/O floor (standard library only)
# --------------------------------------------------------------------------------------------


def read_st_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start offset, header dict) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return 8 + n, header


def st_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def floor_layout(
    base: str, others: tuple[str, ...]
) -> tuple[list[int], list[dict[str, tuple[int, int, int]]], list[Path], int]:
    """What the I/O floors read: the non-base models' files opened, each model's tensors as
    name -> (fd, absolute offset, length), the base's files, and the largest tensor's bytes."""
    fds: list[int] = []
    locs: list[dict[str, tuple[int, int, int]]] = []
    max_len = 0
    for model in others:
        loc: dict[str, tuple[int, int, int]] = {}
        for path in st_files(Path(model)):
            start, header = read_st_header(path)
            fd = os.open(path, os.O_RDONLY)
            fds.append(fd)
            for name, info in header.items():
                if name != "__metadata__":
                    a, b = info["data_offsets"]
                    loc[name] = (fd, start + a, b - a)
                    max_len = max(max_len, b - a)
        locs.append(loc)
    base_files = st_files(Path(base))
    for path in base_files:
        _s, header = read_st_header(path)
        for name, info in header.items():
            if name != "__metadata__":
                a, b = info["data_offsets"]
                max_len = max(max_len, b - a)
    return fds, locs, base_files, max_len


def pread_full(fd: int, view: memoryview, offset: int, length: int) -> None:
    """``length`` bytes of ``fd`` at ``offset`` into the start of ``view``."""
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:length]], offset + got)
        if n <= 0:
            raise OSError(f"short read at {offset + got}")
        got += n


def write_full(fd: int, view: memoryview, length: int) -> None:
    done = 0
    while done < length:
        done += os.write(fd, view[done:length])


def fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)


def child_io_floor(out_dir: str, base: str, *others: str) -> int:
    """Read every tensor of every model once, tensor by tensor (others first, then the base),
    into one reusable buffer, and write the base's tensors out as safetensors files; fsync."""
    t0 = time.perf_counter()
    fds, locs, base_files, max_len = floor_layout(base, others)
    view = memoryview(bytearray(max_len))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    read_bytes = written = 0
    for path in base_files:
        start, header = read_st_header(path)
        entries = sorted(
            (
                (info["data_offsets"], name)
                for name, info in header.items()
                if name != "__metadata__"
            ),
        )
        in_fd = os.open(path, os.O_RDONLY)
        out_fd = os.open(out / path.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            head = os.pread(in_fd, start, 0)
            os.write(out_fd, head)
            written += len(head)
            for (a, b), name in entries:
                for loc in locs:
                    fd, off, length = loc[name]
                    pread_full(fd, view, off, length)
                    read_bytes += length
                pread_full(in_fd, view, start + a, b - a)
                read_bytes += b - a
                write_full(out_fd, view, b - a)
                written += b - a
            os.fsync(out_fd)
        finally:
            os.close(in_fd)
            os.close(out_fd)
    for fd in fds:
        os.close(fd)
    fsync_dir(out)
    stats = {
        "read_bytes": read_bytes,
        "written_bytes": written,
        "buffer_bytes": max_len,
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(stats))
    return 0


def child_device_floor(device: str, out_dir: str, base: str, *others: str) -> int:
    """The I/O floor with the GPU's transfers: every tensor of every model read (plain
    ``pread``s, tensor by tensor, others first, then the base) into one of two pinned
    buffers and copied to ``device`` on a stream of its own while the next is read; the
    base's tensors copied back into a pinned buffer and written out; fsync. What a merge on
    that GPU cannot beat: reading, both copies and writing, without any math."""
    import torch

    t0 = time.perf_counter()
    dev = torch.device(device)
    fds, locs, base_files, max_len = floor_layout(base, others)
    pinned = [torch.empty(max_len, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    views = [memoryview(p.numpy()) for p in pinned]
    sent: list[Any] = [None, None]  # the event of the copy out of each pinned buffer
    back = torch.empty(max_len, dtype=torch.uint8, pin_memory=True)
    on_device = torch.empty(max_len, dtype=torch.uint8, device=dev)
    stream = torch.cuda.Stream(device=dev)
    turn = 0
    read_bytes = written = 0

    def send(fd: int, offset: int, length: int) -> None:
        nonlocal turn, read_bytes
        if sent[turn] is not None:
            sent[turn].synchronize()  # its last copy has left the buffer
        pread_full(fd, views[turn], offset, length)
        with torch.cuda.stream(stream):
            on_device[:length].copy_(pinned[turn][:length], non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        sent[turn] = event
        turn ^= 1
        read_bytes += length

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in base_files:
        start, header = read_st_header(path)
        entries = sorted(
            (info["data_offsets"], name) for name, info in header.items() if name != "__metadata__"
        )
        in_fd = os.open(path, os.O_RDONLY)
        out_fd = os.open(out / path.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            head = os.pread(in_fd, start, 0)
            os.write(out_fd, head)
            written += len(head)
            for (a, b), name in entries:
                for loc in locs:
                    send(*loc[name])
                send(in_fd, start + a, b - a)  # the base last: on_device holds it now
                with torch.cuda.stream(stream):
                    back[: b - a].copy_(on_device[: b - a], non_blocking=True)
                stream.synchronize()
                write_full(out_fd, memoryview(back.numpy()), b - a)
                written += b - a
            os.fsync(out_fd)
        finally:
            os.close(in_fd)
            os.close(out_fd)
    for fd in fds:
        os.close(fd)
    fsync_dir(out)
    stats = {
        "read_bytes": read_bytes,
        "written_bytes": written,
        "buffer_bytes": max_len,
        "gpu_peak_bytes": torch.cuda.max_memory_allocated(dev),
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(stats))
    return 0


def child_ours_on_device(device: str, recipe: str, out: str) -> int:
    """``weightsmith merge RECIPE --out OUT --device DEVICE`` in this process, then the peak
    GPU memory it allocated (a JSON line on stdout)."""
    import torch

    from weightsmith.cli import main as cli

    code = cli(["merge", recipe, "--out", out, "--device", device])
    peak = torch.cuda.max_memory_allocated(torch.device(device))
    print(json.dumps({"gpu_peak_bytes": peak}))
    return code


# --------------------------------------------------------------------------------------------
# Child: output comparison (imports torch; one tensor at a time)
# --------------------------------------------------------------------------------------------


def child_compare(dir_a: str, dir_b: str, base_dir: str) -> int:
    """Ours (a) vs mergekit (b), one tensor at a time: max |a - b|, and the relative L2 error
    of the merged task vector, ||a - b|| / ||b - base|| over all tensors."""
    import torch
    from safetensors import safe_open

    torch.set_grad_enabled(False)

    def tensor_map(d: str) -> dict[str, Path]:
        m: dict[str, Path] = {}
        for path in st_files(Path(d)):
            _s, header = read_st_header(path)
            for name in header:
                if name != "__metadata__":
                    m[name] = path
        return m

    def load(path: Path, name: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)

    ma, mb, mbase = tensor_map(dir_a), tensor_map(dir_b), tensor_map(base_dir)
    common = sorted(set(ma) & set(mb))
    result: dict[str, Any] = {
        "n_tensors": len(common),
        "only_in_ours": sorted(set(ma) - set(mb)),
        "only_in_mergekit": sorted(set(mb) - set(ma)),
        "shape_mismatch": [],
        "dtype_mismatch": [],
        "max_abs_diff": 0.0,
        "max_abs_diff_tensor": None,
        "n_elements": 0,
        "n_different": 0,
        "rel_l2_task_vector": None,
    }
    worst = -1.0
    sq_diff = sq_tv = 0.0
    for name in common:
        ta, tb = load(ma[name], name), load(mb[name], name)
        if ta.dtype != tb.dtype:
            result["dtype_mismatch"].append(f"{name}: {ta.dtype} vs {tb.dtype}")
        if ta.shape != tb.shape:
            result["shape_mismatch"].append(f"{name}: {tuple(ta.shape)} vs {tuple(tb.shape)}")
            continue
        diff = ta.float().sub_(tb.float())
        m = float(diff.abs().max()) if diff.numel() else 0.0
        if math.isnan(m):
            m = math.inf
        sq_diff += float(diff.double().square().sum())
        result["n_elements"] += diff.numel()
        result["n_different"] += int((diff != 0).sum())
        del diff, ta
        if name in mbase:
            tv = tb.float().sub_(load(mbase[name], name).float())
            sq_tv += float(tv.double().square().sum())
            del tv
        if m > worst:
            worst = m
            result["max_abs_diff"] = m
            result["max_abs_diff_tensor"] = name
        del tb
    if sq_tv > 0:
        result["rel_l2_task_vector"] = math.sqrt(sq_diff / sq_tv)
    print(json.dumps(result))
    return 0


def child_compat_compare(spec_path: str) -> int:
    """Compatibility check of one method: ours vs mergekit, both float32, one tensor at a time.

    Per position p: diff = ours - mk and change = mk - base (float64, exact on float32 values);
    ulps = |diff| / ulp of the largest float32 operand at p (base, the inputs, mk's result):
    what float32 rounding of a few operations can explain is a few ulps. rel = |diff| /
    rms(change of that tensor) (per position, the ratio |diff| / |change| is unbounded where
    the change cancels). "Tie positions": p where some model's |τi| (float32, as both tools
    compute it) equals one of that model's selection boundaries for the tensor (TIES: the
    k-th largest |τi|; Breadcrumbs: the ascending ranks bottom and bottom + keep - 1). Away
    from them both tools keep exactly the same entries of every model (and so, with sign
    consensus, elect the same sign), whatever order they give equal magnitudes; figures are
    given over all positions and over the others.
    """
    import torch
    from safetensors import safe_open

    torch.set_grad_enabled(False)
    spec = json.loads(Path(spec_path).read_text())
    selection: str | None = spec["selection"]
    params: list[dict[str, Any]] = spec["params"]
    tol = float(spec["ulp_tol"])

    def tensor_map(d: str) -> dict[str, Path]:
        m: dict[str, Path] = {}
        for path in st_files(Path(d)):
            _s, header = read_st_header(path)
            for name in header:
                if name != "__metadata__":
                    m[name] = path
        return m

    def load(path: Path, name: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)

    def boundaries(mag: torch.Tensor, p: dict[str, Any]) -> list[float]:
        """Values of |τ| at the selection boundary ranks (docs/merge-methods.md)."""
        n, density = mag.numel(), float(p.get("density", 1.0))
        if selection is None or density >= 1 or n == 0:
            return []
        if selection == "topk":
            if density <= 0:
                return []
            k = max(1, int(density * n))  # k-th largest = (n - k + 1)-th smallest
            return [float(torch.kthvalue(mag, n - k + 1).values)]
        keep = int(density * n)
        top = int(float(p.get("gamma", 0.01)) * n)
        bottom = max(0, n - keep - top)
        if keep <= 0:
            return []
        lo = float(torch.kthvalue(mag, bottom + 1).values)  # ascending rank bottom (0-based)
        hi = float(torch.kthvalue(mag, bottom + keep).values)  # rank bottom + keep - 1
        return [lo, hi]

    def rule(mag: torch.Tensor, p: dict[str, Any], bounds: list[float]):
        """(kept, tie) masks of one model's entries: kept whatever the tie order, or tied."""
        density = float(p.get("density", 1.0))
        if selection is None or density >= 1:
            return torch.ones_like(mag, dtype=torch.bool), torch.zeros_like(mag, dtype=torch.bool)
        if not bounds:  # nothing is kept
            return torch.zeros_like(mag, dtype=torch.bool), torch.zeros_like(mag, dtype=torch.bool)
        if selection == "topk":
            (v,) = bounds
            return mag > v, mag == v
        lo, hi = bounds
        return (mag > lo) & (mag < hi), (mag == lo) | (mag == hi)

    weights = [float(p.get("weight", 1.0)) for p in params]
    lam, normalize, consensus = float(spec["lambda"]), bool(spec["normalize"]), spec["consensus"]

    def tie_candidates(
        base: torch.Tensor, thetas: list[torch.Tensor], kts
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged value for every keep/drop choice of the tied entries (float64, at the
        given positions), [2**models, positions], Di = wi·τi in float32 as both tools: with
        the elected sign, and with it flipped where Σ Di is 0 up to float32 rounding (e.g.
        0.3·3u + 0.5·11u − 0.2·32u: 0 exactly, so the tools' rounding picks the sign)."""
        b = base.double()
        taus = [(th - base).mul_(w) for th, w in zip(thetas, weights, strict=True)]
        elected, flipped = [], []
        for c in range(2 ** len(taus)):
            ds = [
                torch.where(kept | (tie & bool(c >> j & 1)), d, torch.zeros_like(d)).double()
                for j, (d, (kept, tie)) in enumerate(zip(taus, kts, strict=True))
            ]
            signs = [None]
            if consensus:
                total = sum(ds)
                positive = total >= 0
                near_zero = total.abs() <= 8 * 2.0**-24 * sum(d.abs() for d in ds)
                signs = [positive, positive ^ near_zero]
            for k, positive in enumerate(signs):
                if positive is not None:
                    agree = [torch.where(positive, d > 0, d < 0) for d in ds]
                    mixed = sum(d * a for d, a in zip(ds, agree, strict=True))
                    div = sum(a.double() * w for a, w in zip(agree, weights, strict=True))
                    div = torch.where(div == 0, torch.ones_like(div), div)
                else:
                    mixed = sum(ds)
                    div = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
                if normalize:
                    mixed = mixed / div
                (elected if k == 0 else flipped).append(b + lam * mixed)
        cand = torch.stack(elected)
        return cand, (torch.stack(flipped) if flipped else cand)

    def ulp_of(x: torch.Tensor) -> torch.Tensor:
        """float32 ulp of |x| (x float32), as float64; 2**-149 at 0 and subnormals."""
        _m, e = torch.frexp(x)  # |x| = m * 2**e, 0.5 <= m < 1
        return torch.ldexp(torch.ones_like(x, dtype=torch.float64), e.clamp(min=-125) - 24)

    def new_acc() -> dict[str, Any]:
        return {
            "n_positions": 0,
            "n_different": 0,
            "max_abs_diff": 0.0,
            "max_ulp": 0.0,
            "max_rel_change": 0.0,
            "rel_l2_change": None,
            "worst_tensor": None,
            "n_over_tol": 0,
            "_sq_diff": 0.0,
            "_sq_change": 0.0,
        }

    def add(acc: dict[str, Any], name: str, adiff, ulps, change, rms: float) -> dict[str, Any]:
        n = adiff.numel()
        acc["n_positions"] += n
        if n == 0:
            return {"max_abs_diff": 0.0, "max_ulp": 0.0, "max_rel_change": 0.0}
        mx, mu = float(adiff.max()), float(ulps.max())
        rel = mx / rms if rms > 0 else (math.inf if mx > 0 else 0.0)
        acc["n_different"] += int((adiff != 0).sum())
        acc["n_over_tol"] += int((ulps > tol).sum())
        acc["_sq_diff"] += float(adiff.square().sum())
        acc["_sq_change"] += float(change.square().sum())
        if mu > acc["max_ulp"]:
            acc["worst_tensor"] = name
        acc["max_abs_diff"] = max(acc["max_abs_diff"], mx)
        acc["max_ulp"] = max(acc["max_ulp"], mu)
        acc["max_rel_change"] = max(acc["max_rel_change"], rel)
        return {"max_abs_diff": mx, "max_ulp": mu, "max_rel_change": rel}

    maps = {
        "ours": tensor_map(spec["ours"]),
        "mk": tensor_map(spec["mergekit"]),
        "base": tensor_map(spec["base"]),
    }
    model_maps = [tensor_map(d) for d in spec["models"]]
    mo, mm = maps["ours"], maps["mk"]
    common = sorted(set(mo) & set(mm))
    out: dict[str, Any] = {
        "n_tensors": len(common),
        "n_excluded": 0,
        "n_excluded_different": 0,
        "only_in_ours": sorted(set(mo) - set(mm)),
        "only_in_mergekit": sorted(set(mm) - set(mo)),
        "shape_mismatch": [],
        "dtype_mismatch": [],
        "no_base": [],
        "tie_unexplained": {"ours": 0, "mergekit": 0},
        # explained only with the sign election flipped where Σ Di cancels (rounding decides)
        "tie_sign_cancel": {"ours": 0, "mergekit": 0},
        "tensors": [],
        "samples": [],
        "tie_samples": [],
    }
    acc_all, acc_kept = new_acc(), new_acc()
    samples: list[dict[str, Any]] = []
    for name in common:
        ours, mk = load(mo[name], name), load(mm[name], name)
        for label, t in (("ours", ours), ("mergekit", mk)):
            if t.dtype != torch.float32:
                out["dtype_mismatch"].append(f"{name}: {label} wrote {t.dtype}, not float32")
        if ours.shape != mk.shape:
            out["shape_mismatch"].append(f"{name}: {tuple(ours.shape)} vs {tuple(mk.shape)}")
            continue
        if name not in maps["base"]:
            out["no_base"].append(name)
            continue
        ours, mk = ours.float().reshape(-1), mk.float().reshape(-1)
        base = load(maps["base"][name], name).float().reshape(-1)
        thetas = [load(m[name], name).float().reshape(-1) for m in model_maps if name in m]
        # largest operand: the ulp of what the tools add up
        scale = torch.maximum(base.abs(), mk.abs())
        for th in thetas:
            torch.maximum(scale, th.abs(), out=scale)
        ulp = ulp_of(scale)
        del scale
        excluded = torch.zeros(base.numel(), dtype=torch.bool)
        bounds: list[list[float]] = []
        mags: list[torch.Tensor] = []
        if selection is not None:
            for th, p in zip(thetas, params, strict=True):
                mag = (th - base).abs()  # float32, as both tools compute τ
                bounds.append(boundaries(mag, p))
                for v in bounds[-1]:
                    excluded |= mag == v
                mags.append(mag)
        diff = ours.double().sub_(mk.double())
        adiff = diff.abs()
        change = mk.double().sub_(base.double())
        rms = math.sqrt(float(change.square().mean())) if change.numel() else 0.0
        ulps = adiff / ulp
        kept = ~excluded
        n_excl = int(excluded.sum())
        out["n_excluded"] += n_excl
        out["n_excluded_different"] += int((adiff[excluded] != 0).sum())
        unexplained = {"ours": 0, "mergekit": 0}
        if n_excl:
            # each tool's value at a tie position must be the merge for some keep/drop choice
            # of the tied entries: then the difference there is the tie order, nothing else
            idx = excluded.nonzero().squeeze(1)
            kts = [rule(m[idx], p, bd) for m, p, bd in zip(mags, params, bounds, strict=True)]
            cand, cand_flip = tie_candidates(base[idx], [th[idx] for th in thetas], kts)
            tol_abs = tol * ulp[idx]
            for label, t in (("ours", ours), ("mergekit", mk)):
                v = t[idx].double()
                by_order = ((cand - v).abs() <= tol_abs).any(0)
                by_sign = ~by_order & ((cand_flip - v).abs() <= tol_abs).any(0)
                bad = ~(by_order | by_sign)
                unexplained[label] = int(bad.sum())
                out["tie_unexplained"][label] += unexplained[label]
                out["tie_sign_cancel"][label] += int(by_sign.sum())
                for i in idx[bad][:3].tolist():
                    out["tie_samples"].append(
                        {
                            "tool": label,
                            "tensor": name,
                            "flat_index": i,
                            "value": float(t[i]),
                            "other": float((mk if label == "ours" else ours)[i]),
                            "base": float(base[i]),
                            "tau": [float(th[i]) - float(base[i]) for th in thetas],
                            "boundaries": bounds,
                        }
                    )
            del cand, cand_flip, kts, idx, tol_abs
        fig_all = add(acc_all, name, adiff, ulps, change, rms)
        fig_kept = add(acc_kept, name, adiff[kept], ulps[kept], change[kept], rms)
        out["tensors"].append(
            {
                "name": name,
                "n": base.numel(),
                "excluded": n_excl,
                "tie_unexplained": unexplained,
                "rms_change": rms,
                "all": fig_all,
                "non_tie": fig_kept,
                "boundaries": bounds,
            }
        )
        # the worst positions away from ties, with what each model contributes there
        if fig_kept["max_ulp"] > tol:
            masked = torch.where(kept, ulps, torch.zeros_like(ulps))
            top = torch.topk(masked, min(5, masked.numel())).indices.tolist()
            for i in top:
                if float(masked[i]) <= tol:
                    break
                taus = [float(th[i]) - float(base[i]) for th in thetas]
                samples.append(
                    {
                        "tensor": name,
                        "flat_index": i,
                        "ulps": float(ulps[i]),
                        "ours": float(ours[i]),
                        "mergekit": float(mk[i]),
                        "base": float(base[i]),
                        "inputs": [float(th[i]) for th in thetas],
                        "tau": taus,
                        "boundaries": bounds,
                        "kept_by_rule": [
                            _kept_by_rule(selection, float(mags[j][i]), bounds[j])
                            for j in range(len(mags))
                        ],
                    }
                )
            samples = sorted(samples, key=lambda d: -d["ulps"])[:10]
        del ours, mk, base, thetas, diff, adiff, change, ulps, excluded, kept, ulp, mags
    for acc in (acc_all, acc_kept):
        sq_d, sq_c = acc.pop("_sq_diff"), acc.pop("_sq_change")
        acc["rel_l2_change"] = math.sqrt(sq_d / sq_c) if sq_c > 0 else None
    out["all"], out["non_tie"], out["samples"] = acc_all, acc_kept, samples
    out["tie_samples"] = out["tie_samples"][:10]
    print(json.dumps(out))
    return 0


def _kept_by_rule(selection: str | None, mag: float, bounds: list[float]) -> str:
    """Whether an entry with |τ| = mag is kept by the selection, given its boundary values."""
    if selection is None or not bounds:
        return "kept"
    if selection == "topk":
        (v,) = bounds
        return "kept" if mag > v else ("dropped" if mag < v else "tie")
    lo, hi = bounds
    if lo < mag < hi:
        return "kept"
    return "tie" if mag in (lo, hi) else "dropped"


# --------------------------------------------------------------------------------------------
# Running and measuring children
# --------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    ok: bool
    rc: int | None
    wall_s: float  # child wall + post-run sync
    child_wall_s: float
    sync_s: float
    maxrss_mib: float
    sampled: dict[str, float]  # peaks of /proc/*/status fields over the child's process tree
    cpu_s: float  # the child's user + system CPU time (its reaped children included)
    stdout: str
    stderr_tail: str
    timed_out: bool = False
    io: dict[str, int] = field(default_factory=dict)  # the child's /proc/<pid>/io at its exit


IO_FIELDS = ("rchar", "wchar", "read_bytes", "write_bytes", "cancelled_write_bytes")


def read_proc_io(pid: int) -> dict[str, int]:
    """/proc/<pid>/io of a process (also of an exited, not yet reaped one): its own threads'
    counts plus those of the children it reaped. rchar/wchar: bytes passed through read- and
    write-type system calls (page-cache hits included, mmap'd file access not);
    read_bytes/write_bytes: bytes the process made the block layer fetch from / send to
    storage (page faults of mmap'd files included, page-cache hits not; writes counted when
    pages are dirtied); {} when it can't be read."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/io") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in IO_FIELDS:
                out[key] = int(value)
    return out


class RssSampler(threading.Thread):
    """Samples VmRSS / RssAnon / RssFile of a process and its descendants (summed) every 20 ms.

    ru_maxrss counts file-backed pages too (e.g. mmap'd safetensors inputs, which the kernel can
    drop at will); RssAnon is the memory a process really owns. Sampling can miss short peaks.
    """

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peaks_kib = dict.fromkeys(self.FIELDS, 0)
        self._stop_event = threading.Event()

    def _tree(self) -> list[int]:
        pids, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo += [int(c) for c in f.read().split()]
        return pids

    def sample(self) -> None:
        totals = dict.fromkeys(self.FIELDS, 0)
        for pid in self._tree():
            with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in totals:
                        totals[key] += int(rest.split()[0])
        for key, value in totals.items():
            self.peaks_kib[key] = max(self.peaks_kib[key], value)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def peaks_mib(self) -> dict[str, float]:
        return {k: v / 1024.0 for k, v in self.peaks_kib.items()}


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(CHILD_ENV)
    return env


def tail(text: str, lines: int = 25, chars: int = 4000) -> str:
    return "\n".join(text.splitlines()[-lines:])[-chars:]


def run_measured(
    cmd: list[str], log_dir: Path, label: str, timeout: float, flush: bool = True
) -> RunResult:
    """Run cmd as a child; wall time (plus a post-exit sync), peak RSS via os.wait4."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{label}.out", log_dir / f"{label}.err"
    if flush:
        os.sync()
    timed_out = threading.Event()
    with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out_f,
            stderr=err_f,
            env=child_env(),
            start_new_session=True,
        )

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        sampler = RssSampler(proc.pid)
        sampler.start()
        try:
            # wait for the exit without reaping, so that /proc/<pid>/io is still there
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            io = read_proc_io(proc.pid)
            _pid, status, rusage = os.wait4(proc.pid, 0)
        except BaseException:  # e.g. Ctrl-C: the child is in its own session, take it down
            kill()
            os.wait4(proc.pid, 0)
            proc.returncode = -9
            raise
        finally:
            timer.cancel()
            sampler.stop()
        child_wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    t1 = time.perf_counter()
    if flush:
        os.sync()
    sync_s = time.perf_counter() - t1 if flush else 0.0
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    rc = proc.returncode
    return RunResult(
        ok=rc == 0 and not timed_out.is_set(),
        rc=rc,
        wall_s=child_wall + sync_s,
        child_wall_s=child_wall,
        sync_s=sync_s,
        maxrss_mib=rusage.ru_maxrss / 1024.0,  # Linux: KiB
        cpu_s=rusage.ru_utime + rusage.ru_stime,
        sampled=sampler.peaks_mib(),
        stdout=stdout,
        stderr_tail=tail(stderr) if stderr.strip() else tail(stdout),
        timed_out=timed_out.is_set(),
        io=io,
    )


def run_plain(cmd: list[str], timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=timeout,
        check=False,
    )


def say(msg: str = "") -> None:
    print(msg, flush=True)


def warn_block(title: str, body: str) -> None:
    say(f"!! {title}")
    for line in body.splitlines():
        say(f"   | {line}")


# --------------------------------------------------------------------------------------------
# Setup: models, mergekit virtualenv, weightsmith CLI
# --------------------------------------------------------------------------------------------


def ensure_models(
    data_dir: Path,
    size_gb: float,
    seed: int,
    width_of_gb: float | None = None,
    n_finetunes: int = N_FINETUNES,
    preset: str | None = None,
) -> tuple[Shape, list[Path]]:
    """The base and fine-tunes ft1..ftN (each cached on its own: a run with fewer fine-tunes
    reuses those of a run with more); ``preset`` (a PRESETS key) replaces the size."""
    if preset is not None:
        shape = PRESETS[preset]
        root = data_dir / "models" / f"llama-{preset}-seed{seed}"
    else:
        shape = choose_shape(size_gb, width_of_gb)
        width = f"-w{width_of_gb:g}" if width_of_gb else ""
        root = data_dir / "models" / f"llama-{size_gb:g}gb{width}-seed{seed}"
    dirs = [root / "base"] + [root / f"ft{k}" for k in range(1, n_finetunes + 1)]
    for index, d in enumerate(dirs):
        key = {
            "version": GEN_VERSION,
            "shape": shape_key(shape),
            "seed": seed,
            "index": index,
            "delta_rel": DELTA_REL,
            "shard_bytes": SHARD_BYTES,
        }
        marker = d / ".synth.json"
        if marker.exists() and json.loads(marker.read_text()) == key and st_files(d):
            say(f"   reusing {d}")
            continue
        say(f"   generating {d} ...")
        root.mkdir(parents=True, exist_ok=True)
        spec = {
            "shape": asdict(shape),
            "out": str(d),
            "index": index,
            "seed": seed,
            "shard_bytes": SHARD_BYTES,
            "key": key,
        }
        spec_path = root / f".spec-{d.name}.json"
        spec_path.write_text(json.dumps(spec))
        t0 = time.perf_counter()
        proc = run_plain([sys.executable, str(THIS), "_gen", str(spec_path)])
        spec_path.unlink(missing_ok=True)
        if proc.returncode != 0:
            warn_block(f"generating {d} failed (rc={proc.returncode})", tail(proc.stderr))
            raise SystemExit(2)
        say(f"   ... {dir_bytes(d) / MIB:.0f} MiB in {time.perf_counter() - t0:.1f} s")
    return shape, dirs


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in st_files(d))


def ensure_mergekit(venv: Path) -> Path | None:
    """mergekit-yaml from a dedicated venv (created when missing); None when it can't be had."""
    exe = venv / "bin" / "mergekit-yaml"
    marker = venv / ".bench-installed"
    if exe.exists() and marker.exists():
        return exe
    py = venv / "bin" / "python"
    steps: list[list[str]] = []
    if not py.exists():
        steps.append([sys.executable, "-m", "venv", str(venv)])
    # torch first, pinned: a looser requirement (mergekit's) would pull a multi-GB CUDA build.
    steps.append([str(py), "-m", "pip", "install", "--quiet", TORCH_PIN])
    steps.append([str(py), "-m", "pip", "install", "--quiet", MERGEKIT_PIN])
    say(f"   creating {venv} ({TORCH_PIN}, then {MERGEKIT_PIN}) ...")
    t0 = time.perf_counter()
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            warn_block(f"{' '.join(cmd)} failed", tail(proc.stderr or proc.stdout))
            return None
    if not exe.exists():
        warn_block("mergekit-yaml missing after install", str(exe))
        return None
    marker.write_text(f"{TORCH_PIN}\n{MERGEKIT_PIN}\n")
    say(f"   ... done in {time.perf_counter() - t0:.0f} s")
    return exe


def mergekit_cmd(exe: Path, recipe: Path, out: Path) -> list[str]:
    return [
        str(exe),
        str(recipe),
        str(out),
        "--no-cuda",
        "--allow-crimes",
        "--no-copy-tokenizer",
        "--no-write-model-card",
        "--out-shard-size",
        MERGEKIT_OUT_SHARD,
        "--quiet",
    ]


def probe_device(device: str) -> str | None:
    """The name of the CUDA GPU ``device`` names, as torch sees it in a child (None: none)."""
    code = (
        "import sys, torch\n"
        f"d = torch.device({device!r})\n"
        "ok = torch.cuda.is_available() and (d.index or 0) < torch.cuda.device_count()\n"
        "print(torch.cuda.get_device_name(d) if ok else '')\n"
    )
    try:
        proc = run_plain([sys.executable, "-c", code], timeout=300)
    except subprocess.TimeoutExpired:
        return None
    name = proc.stdout.strip()
    return name if proc.returncode == 0 and name else None


def probe_weightsmith(exe: Path) -> tuple[bool, str]:
    """(usable, note)."""
    if not exe.exists():
        return False, f"{exe} does not exist"
    try:
        proc = run_plain([str(exe), "merge", "--help"], timeout=120)
    except subprocess.TimeoutExpired:
        return True, "`weightsmith merge --help` timed out; trying the runs anyway"
    if proc.returncode == 0:
        return True, ""
    err = proc.stderr + proc.stdout
    if "No module named 'weightsmith" in err:  # the console script is there, the CLI isn't yet
        return False, f"`{exe} merge --help` cannot import the CLI yet:\n{tail(err, 6)}"
    return True, f"`weightsmith merge --help` exited {proc.returncode}; trying the runs anyway"


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid YAML double-quoted scalar


def write_sliced_recipe(path: Path, key: str, base: Path, finetunes: list[Path]) -> None:
    """A ``slices`` recipe (as JSON, which YAML readers take as it is)."""
    r = RECIPES[key]
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    b, f = str(base.resolve()), str(finetunes[0].resolve())
    if r["slices"] == "two_models_all_layers":
        slices = [
            {"sources": [{"model": b, "layer_range": [0, layers]},
                         {"model": f, "layer_range": [0, layers]}]}
        ]  # fmt: skip
    else:
        cut = max(1, (3 * layers) // 4)
        slices = [
            {"sources": [{"model": b, "layer_range": [0, cut]}]},
            {"sources": [{"model": f, "layer_range": [layers - cut, layers]}]},
        ]
    recipe: dict[str, Any] = {"merge_method": r["method"], "slices": slices}
    if r["method"] != "passthrough":
        recipe["base_model"] = b
    if r["shared"]:
        recipe["parameters"] = r["shared"]
    recipe.update({"dtype": "float16", "out_dtype": "float16"})
    path.write_text(json.dumps(recipe, indent=1) + "\n")


def write_recipe(path: Path, method: str, base: Path, finetunes: list[Path]) -> None:
    if "slices" in RECIPES[method]:
        write_sliced_recipe(path, method, base, finetunes)
        return
    r = RECIPES[method]
    lines = [
        f"merge_method: {r.get('method', method)}",
        f"base_model: {_yaml_scalar(base.resolve())}",
        "models:",
    ]
    for ft in finetunes:
        lines.append(f"  - model: {_yaml_scalar(ft.resolve())}")
        if r["model"]:
            lines.append("    parameters:")
            lines += [f"      {k}: {_yaml_scalar(v)}" for k, v in r["model"].items()]
    if r["shared"]:
        lines.append("parameters:")
        lines += [f"  {k}: {_yaml_scalar(v)}" for k, v in r["shared"].items()]
    lines += ["dtype: float16", "out_dtype: float16", ""]
    path.write_text("\n".join(lines))


def write_compat_recipe(path: Path, method: str, dirs: list[Path]) -> None:
    """The COMPAT_RECIPES entry for ``method`` over dirs = [base, ft1, ...], all in float32."""
    r = COMPAT_RECIPES[method]
    lines = [f"merge_method: {method}"]
    if r["base"] is not None:
        lines.append(f"base_model: {_yaml_scalar(dirs[r['base']].resolve())}")
    lines.append("models:")
    for idx, params in r["models"]:
        lines.append(f"  - model: {_yaml_scalar(dirs[idx].resolve())}")
        if params:
            lines.append("    parameters:")
            lines += [f"      {k}: {_yaml_scalar(v)}" for k, v in params.items()]
    if r["shared"]:
        lines.append("parameters:")
        lines += [f"  {k}: {_yaml_scalar(v)}" for k, v in r["shared"].items()]
    lines += ["dtype: float32", "out_dtype: float32", ""]
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    method: str
    tool: str
    ok: bool
    wall_s: float | None = None
    child_wall_s: float | None = None
    sync_s: float | None = None
    input_mib_s: float | None = None
    peak_rss_mib: float | None = None  # ru_maxrss
    cpu_s: float | None = None  # user + system CPU seconds (os.wait4)
    peak_anon_mib: float | None = None  # sampled RssAnon over the process tree
    peak_file_mib: float | None = None  # sampled RssFile (mmap'd files, shared libraries)
    vs_mergekit: float | None = None  # mergekit wall / this wall (ours only)
    vs_floor: float | None = None  # this wall / floor wall
    vs_device_floor: float | None = None  # --device: this wall / the floor with transfers
    gpu_peak_mib: float | None = None  # --device: torch.cuda.max_memory_allocated
    walls_s: list[float] | None = None  # --repeats: every run's wall (this row: the median's)
    max_abs_diff: float | None = None  # ours vs mergekit
    io: dict[str, int] = field(default_factory=dict)  # /proc/<pid>/io of the child at exit
    note: str = ""
    compare: dict[str, Any] | None = field(default=None, repr=False)


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def io_pair(io: dict[str, int], syscall: str, storage: str) -> str:
    """The pair "syscall/storage" in MiB, "-" for a missing figure."""
    return "/".join("-" if k not in io else f"{io[k] / MIB:.0f}" for k in (syscall, storage))


def print_table(rows: list[Row], on_device: bool = False) -> None:
    head = [
        "method",
        "tool",
        "wall s",
        "in MiB/s",
        "peak RSS MiB",
        "anon MiB",
        "x mergekit",
        "x floor",
        *(["x dev floor", "GPU peak MiB"] if on_device else []),
        "read MiB (rchar/disk)",
        "written MiB (wchar/disk)",
        "max|diff| vs mk",
        "status",
    ]
    body = []
    for r in rows:
        diff = "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.3g}"
        if r.compare and r.compare.get("rel_l2_task_vector") is not None:
            diff += f" ({100 * r.compare['rel_l2_task_vector']:.2g}%)"
        body.append(
            [
                r.method,
                r.tool,
                fmt(r.wall_s, ".2f"),
                fmt(r.input_mib_s, ".0f"),
                fmt(r.peak_rss_mib, ".0f"),
                fmt(r.peak_anon_mib, ".0f"),
                fmt(r.vs_mergekit, ".2f"),
                fmt(r.vs_floor, ".2f"),
                *([fmt(r.vs_device_floor, ".2f"), fmt(r.gpu_peak_mib, ".0f")] if on_device else []),
                io_pair(r.io, "rchar", "read_bytes"),
                io_pair(r.io, "wchar", "write_bytes"),
                diff,
                "ok" if r.ok else ("FAILED " + r.note).strip(),
            ]
        )
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    say(line)
    say("-" * len(line))
    for b in body:
        say("  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)))


def run_compat(
    data_dir: Path,
    size_gb: float,
    seed: int,
    methods: list[str],
    ours_exe: Path,
    mk_exe: Path,
    timeout: float,
    keep_outputs: bool,
) -> dict[str, Any]:
    """Each method in float32 by both tools, compared position by position (see
    child_compat_compare); works in <data_dir>/compat, never in runs/."""
    say()
    say(f"== compatibility: weightsmith vs mergekit, both in float32, {size_gb:g} GB models")
    say("-- models")
    shape, dirs = ensure_models(data_dir, size_gb, seed)
    work = data_dir / "compat"
    shutil.rmtree(work, ignore_errors=True)
    log_dir = work / "logs"
    log_dir.mkdir(parents=True)
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        r = COMPAT_RECIPES[method]
        recipe = work / f"{method}.yaml"
        write_compat_recipe(recipe, method, dirs)
        out_ours, out_mk = work / f"out-{method}-weightsmith", work / f"out-{method}-mergekit"
        entry: dict[str, Any] = {"ok": False, "verdict": "FAILED", "note": ""}
        results[method] = entry
        say(f"-- {method}: weightsmith and mergekit, dtype/out_dtype float32")
        runs = {
            "weightsmith": [str(ours_exe), "merge", str(recipe), "--out", str(out_ours), "--quiet"],
            "mergekit": mergekit_cmd(mk_exe, recipe, out_mk),
        }
        failed = []
        for tool, cmd in runs.items():
            res = run_measured(cmd, log_dir, f"{method}-{tool}", timeout, flush=False)
            entry[f"{tool}_wall_s"] = res.child_wall_s
            if not res.ok:
                failed.append(tool)
                note = "timeout" if res.timed_out else f"rc={res.rc}"
                warn_block(f"{method}/{tool} (float32) failed ({note}); tail:", res.stderr_tail)
        if failed:
            entry["note"] = f"{', '.join(failed)} failed"
        else:
            base = dirs[r["base"]] if r["base"] is not None else dirs[0]
            spec = {
                "ours": str(out_ours),
                "mergekit": str(out_mk),
                "base": str(base),
                "models": [str(dirs[i]) for i, _p in r["models"]],
                "params": [p for _i, p in r["models"]],
                "selection": r["selection"],
                "consensus": r.get("consensus", False),
                "normalize": r["shared"].get("normalize", r.get("normalize", False)),
                "lambda": r["shared"].get("lambda", 1.0),
                "ulp_tol": COMPAT_ULP_TOL,
            }
            spec_path = work / f"{method}.compare.json"
            spec_path.write_text(json.dumps(spec))
            proc = run_plain([sys.executable, str(THIS), "_compat", str(spec_path)])
            if proc.returncode == 0:
                cmp = json.loads(proc.stdout.strip().splitlines()[-1])
                entry.update(cmp)
                entry["ok"] = True
                problems = [
                    k
                    for k in (
                        "only_in_ours",
                        "only_in_mergekit",
                        "shape_mismatch",
                        "dtype_mismatch",
                        "no_base",
                    )
                    if cmp[k]
                ]
                within = cmp["non_tie"]["max_ulp"] <= COMPAT_ULP_TOL
                ties_ok = cmp["tie_unexplained"]["ours"] == 0
                entry["verdict"] = "match" if within and ties_ok and not problems else "DIFFER"
                if problems:
                    entry["note"] = "; ".join(f"{k}: {cmp[k][:3]}" for k in problems)
                a, k = cmp["all"], cmp["non_tie"]
                say(
                    f"   {cmp['n_tensors']} tensors; all positions: max|diff| "
                    f"{a['max_abs_diff']:.3g} ({a['max_ulp']:.3g} ulp); "
                    f"{cmp['n_excluded']} tie positions excluded; others: max|diff| "
                    f"{k['max_abs_diff']:.3g} (max {k['max_ulp']:.3g} ulp, first in "
                    f"{k['worst_tensor']}); tie positions not explained by a tie order: ours "
                    f"{cmp['tie_unexplained']['ours']}, mergekit "
                    f"{cmp['tie_unexplained']['mergekit']}: {entry['verdict']}"
                )
            else:
                entry["note"] = "comparison failed"
                warn_block(f"{method}: comparison failed", tail(proc.stderr))
        if not keep_outputs:
            shutil.rmtree(out_ours, ignore_errors=True)
            shutil.rmtree(out_mk, ignore_errors=True)
    say()
    say(
        f"== compatibility results: {size_gb:g} GB model ({shape.layers} layers, hidden "
        f"{shape.hidden}), weightsmith vs mergekit 0.1.5, both computing and writing float32"
    )
    print_compat_table(results)
    say("notes:")
    say("  - tie pos.: positions where some model's |tau| (float32) equals its selection boundary")
    say("    (TIES: k-th largest |tau|; breadcrumbs: ascending ranks bottom, bottom+keep-1); the")
    say("    tools rank equal magnitudes differently there. 'differ' = how many of them differ;")
    say("    'unexpl.' (ours/mk) = how many of them match no keep/drop choice of the tied entries")
    say("    (float64 re-computation), i.e. differ for another reason than the tie order")
    say("  - ulp: |ours - mk| in float32 ulps of the largest operand at that position (base,")
    say(f"    inputs, result); a few is float32 rounding. match: <= {COMPAT_ULP_TOL:g} off ties")
    say("  - rel: max |ours - mk| / rms(mk - base) of the tensor, i.e. relative to the typical")
    say("    merged change; rel L2 = ||ours - mk|| / ||mk - base||. The changes here are ~1% of")
    say("    the weights, so one float32 ulp of the output is already ~1e-5 of the change")
    for method, e in results.items():
        if e["verdict"] == "match":
            continue
        say(f"!! {method}: {e['verdict']} {e['note']}".rstrip())
        for smp in e.get("tie_samples", [])[:5]:
            say(
                f"   tie, {smp['tool']}: {smp['tensor']}[{smp['flat_index']}] = {smp['value']!r} "
                f"(other {smp['other']!r}), base {smp['base']!r}, "
                f"tau {[f'{t:.6g}' for t in smp['tau']]}"
            )
        for smp in e.get("samples", [])[:5]:
            say(
                f"   {smp['tensor']}[{smp['flat_index']}]: ours {smp['ours']!r} mk "
                f"{smp['mergekit']!r} ({smp['ulps']:.3g} ulp), base {smp['base']!r}, "
                f"tau {[f'{t:.6g}' for t in smp['tau']]}, kept by rule {smp['kept_by_rule']}"
            )
    return {
        "size_gb": size_gb,
        "shape": asdict(shape),
        "ulp_tol": COMPAT_ULP_TOL,
        "recipes": {m: COMPAT_RECIPES[m] for m in methods},
        "methods": results,
        "all_match": all(e["verdict"] == "match" for e in results.values()),
    }


def print_compat_table(results: dict[str, dict[str, Any]]) -> None:
    head = [
        "method",
        "tensors",
        "positions",
        "tie pos.",
        "differ",
        "unexpl.",
        "all: max|diff|",
        "ulp",
        "rel",
        "non-tie: max|diff|",
        "ulp",
        "rel",
        "rel L2",
        "verdict",
    ]
    body = []
    for method, e in results.items():
        if not e["ok"]:
            body.append([method] + ["-"] * (len(head) - 2) + [f"{e['verdict']} {e['note']}"])
            continue
        a, k = e["all"], e["non_tie"]
        body.append(
            [
                method,
                str(e["n_tensors"]),
                str(a["n_positions"]),
                str(e["n_excluded"]),
                str(e["n_excluded_different"]),
                f"{e['tie_unexplained']['ours']}/{e['tie_unexplained']['mergekit']}",
                f"{a['max_abs_diff']:.3g}",
                f"{a['max_ulp']:.3g}",
                f"{a['max_rel_change']:.2g}",
                f"{k['max_abs_diff']:.3g}",
                f"{k['max_ulp']:.3g}",
                f"{k['max_rel_change']:.2g}",
                fmt(k["rel_l2_change"], ".2g"),
                e["verdict"],
            ]
        )
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    say(line)
    say("-" * len(line))
    for b in body:
        say("  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)))


def baseline_rss_mib() -> float:
    """ru_maxrss that a trivial child spawned from this process reports (inherited floor)."""
    true = shutil.which("true") or "/bin/true"
    proc = subprocess.Popen([true])
    _pid, _status, ru = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return ru.ru_maxrss / 1024.0


def warm_up(dirs: list[Path]) -> tuple[int, float]:
    """Read every input file once so that all contenders see warm page caches."""
    t0 = time.perf_counter()
    total = 0
    buf = bytearray(MIB)  # small: children inherit this process's peak RSS in ru_maxrss
    for d in dirs:
        for p in st_files(d):
            with open(p, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
    return total, time.perf_counter() - t0


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Benchmark `weightsmith merge` against mergekit 0.1.5 and an I/O floor.",
    )
    ap.add_argument(
        "--width-of-gb",
        type=float,
        default=None,
        help="use the tensor shapes of a model of this size (only the layer count follows "
        "--size-gb), to compare peak memory across model sizes",
    )
    ap.add_argument(
        "--size-gb",
        type=float,
        default=None,
        help="model size (fp16), default 1.0 (with --compat: --compat-size-gb)",
    )
    ap.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="the tensor shapes of a real model instead of --size-gb "
        "(3b: Llama-3.2-3B, 6.43 GB fp16 per model)",
    )
    ap.add_argument(
        "--finetunes",
        type=int,
        default=N_FINETUNES,
        help=f"number of fine-tunes merged into the base (default {N_FINETUNES})",
    )
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"default {DEFAULT_METHODS}")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument(
        "--compat",
        action="store_true",
        help="only the compatibility check (both tools in float32), on --size-gb models",
    )
    mode.add_argument(
        "--skip-compat", action="store_true", help="no compatibility check after the benchmark"
    )
    ap.add_argument(
        "--compat-size-gb",
        type=float,
        default=COMPAT_SIZE_GB,
        help=f"model size for the compatibility check after a run, default {COMPAT_SIZE_GB:g}",
    )
    ap.add_argument(
        "--compat-methods",
        default=DEFAULT_COMPAT_METHODS,
        help=f"default {DEFAULT_COMPAT_METHODS}",
    )
    ap.add_argument(
        "--device",
        default="cpu",
        help="where our merges compute: cpu (default), cuda or cuda:N (then also a floor "
        "with the GPU's transfers, the peak GPU memory, and no mergekit or compat runs)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each of our merges, one after the other; the figures are the run of "
        "the median wall (ratios to linear then compare medians). Default 1",
    )
    ap.add_argument("--skip-mergekit", action="store_true", help="no mergekit runs (nor diffs)")
    ap.add_argument("--skip-floor", action="store_true", help="no I/O floor run")
    ap.add_argument("--keep-outputs", action="store_true", help="keep merged outputs")
    ap.add_argument(
        "--keep-models",
        action="store_true",
        help="with --preset: keep the generated models (by default deleted after the run)",
    )
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="default bench/.data")
    ap.add_argument("--seed", type=int, default=0, help="synthetic model seed (default 0)")
    ap.add_argument(
        "--weightsmith",
        type=Path,
        default=Path(sys.prefix) / "bin" / "weightsmith",
        help="our CLI (default <sys.prefix>/bin/weightsmith)",
    )
    ap.add_argument("--mergekit-venv", type=Path, default=DEFAULT_MERGEKIT_VENV)
    ap.add_argument("--timeout", type=float, default=3600.0, help="per child, seconds")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in RECIPES]
    if unknown or not methods:
        ap.error(f"unknown method(s) {unknown}; known: {', '.join(RECIPES)}")
    compat_methods = [m.strip() for m in args.compat_methods.split(",") if m.strip()]
    unknown = [m for m in compat_methods if m not in COMPAT_RECIPES]
    if unknown or not compat_methods:
        ap.error(f"unknown compat method(s) {unknown}; known: {', '.join(COMPAT_RECIPES)}")
    if args.preset is not None:
        if args.size_gb is not None or args.width_of_gb is not None or args.compat:
            ap.error("--preset replaces --size-gb and --width-of-gb; not with --compat")
        shape = PRESETS[args.preset]
        args.size_gb = sum(_numel(d) for _n, d, _k in tensor_specs(shape)) * 2 / GB
    if not 1 <= args.finetunes <= 16:
        ap.error(f"--finetunes must be between 1 and 16, got {args.finetunes}")
    if args.size_gb is None:
        args.size_gb = args.compat_size_gb if args.compat else 1.0
    if args.size_gb <= 0 or args.compat_size_gb <= 0:
        ap.error("--size-gb and --compat-size-gb must be positive")
    if args.compat and args.skip_mergekit:
        ap.error("--compat needs mergekit")
    device = args.device.strip().lower()
    if device != "cpu" and not (
        device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        ap.error(f"--device must be cpu, cuda or cuda:N, not {args.device!r}")
    if device != "cpu" and args.compat:
        ap.error("--compat compares CPU outputs with mergekit's; not with --device")
    args.device = device
    args.methods = methods
    args.compat_methods = compat_methods
    return args


def main_compat(args: argparse.Namespace) -> int:
    """--compat: the compatibility check alone; results in <data-dir>/results-compat.json."""
    data_dir: Path = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    ours_exe: Path = args.weightsmith
    ours_ok, ours_note = probe_weightsmith(ours_exe)
    say("-- tools")
    if not ours_ok:
        warn_block("weightsmith CLI not available", ours_note)
        return 2
    say(f"   weightsmith: {ours_exe}" + (f" ({ours_note})" if ours_note else ""))
    mk_exe = ensure_mergekit(args.mergekit_venv.resolve())
    if mk_exe is None:
        say("   mergekit: unavailable")
        return 2
    say(f"   mergekit: {mk_exe}")
    compat = run_compat(
        data_dir,
        args.size_gb,
        args.seed,
        args.compat_methods,
        ours_exe,
        mk_exe,
        args.timeout,
        args.keep_outputs,
    )
    compat["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result_path = data_dir / "results-compat.json"
    result_path.write_text(json.dumps(compat, indent=2) + "\n")
    say(f"\nwrote {result_path}")
    if not compat["all_match"]:
        say("the compatibility check found differences away from tie positions (see above)")
        return 1
    return 0


def _memory_bytes() -> int:
    """Physical memory (the page cache cannot hold inputs much larger than half of it)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.compat:
        return main_compat(args)
    found: str | None = None
    if args.device != "cpu":  # before anything is built: never a figure for a missing GPU
        found = probe_device(args.device)
        if found is None:
            say(f"!! --device {args.device}: torch sees no such CUDA GPU here; no GPU figure")
            return 2
    data_dir: Path = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    run_dir = data_dir / "runs"
    log_dir = run_dir / "logs"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)

    what = f"{args.size_gb:g} GB"
    if args.preset:
        what = f"{args.preset} preset ({args.size_gb:.2f} GB)"
    say(f"== weightsmith merge bench: {what} fp16 Llama, base + {args.finetunes} fine-tunes")
    say("-- models")
    shape, dirs = ensure_models(
        data_dir, args.size_gb, args.seed, args.width_of_gb, args.finetunes, args.preset
    )
    base, finetunes = dirs[0], dirs[1:]
    input_bytes = sum(dir_bytes(d) for d in dirs)
    specs = tensor_specs(shape)
    largest_mib = max(_numel(s) for _n, s, _k in specs) * 2 / MIB
    n_params = sum(_numel(s) for _n, s, _k in specs)
    say(
        f"   shape: hidden {shape.hidden}, intermediate {shape.intermediate}, "
        f"layers {shape.layers}, heads {shape.heads}/{shape.kv_heads}, vocab {shape.vocab}; "
        f"{n_params / 1e6:.0f} M params, "
        f"{len(specs)} tensors, largest {largest_mib:.1f} MiB"
    )
    say(f"   inputs: {input_bytes / MIB:.0f} MiB in {len(dirs)} models")

    ours_exe: Path = args.weightsmith
    ours_ok, ours_note = probe_weightsmith(ours_exe)
    say("-- tools")
    if ours_ok:
        say(f"   weightsmith: {ours_exe}" + (f" ({ours_note})" if ours_note else ""))
    else:
        warn_block("weightsmith CLI not available: skipping our rows", ours_note)
    mk_exe: Path | None = None
    on_device = args.device != "cpu"
    if on_device:
        say(f"   device: {args.device}, {found}")
        say("   (mergekit and the compatibility check run on the CPU: skipped)")
    elif not args.skip_mergekit:
        mk_exe = ensure_mergekit(args.mergekit_venv.resolve())
        say(f"   mergekit: {mk_exe}" if mk_exe else "   mergekit: unavailable, skipping its rows")

    recipes = {}
    for method in args.methods:
        recipes[method] = run_dir / f"{method}.yaml"
        write_recipe(recipes[method], method, base, finetunes)

    say("-- warm-up: reading every input once (all runs below see inputs in the page cache)")
    nbytes, secs = warm_up(dirs)
    say(f"   {nbytes / MIB:.0f} MiB in {secs:.1f} s")
    rss0 = baseline_rss_mib()

    rows: list[Row] = []

    def measured(method: str, tool: str, cmd: list[str]) -> tuple[Row, RunResult]:
        say(f"-- {method} / {tool}: {' '.join(cmd)}")
        res = run_measured(cmd, log_dir, f"{method}-{tool}", args.timeout)
        row = Row(method=method, tool=tool, ok=res.ok)
        if res.ok:
            row.wall_s, row.child_wall_s, row.sync_s = res.wall_s, res.child_wall_s, res.sync_s
            row.input_mib_s = input_bytes / MIB / res.wall_s
            row.peak_rss_mib = res.maxrss_mib
            row.cpu_s = res.cpu_s
            row.peak_anon_mib = res.sampled["RssAnon"]
            row.peak_file_mib = res.sampled["RssFile"]
            row.io = res.io
            say(
                f"   {res.wall_s:.2f} s (child {res.child_wall_s:.2f} + sync {res.sync_s:.2f}; "
                f"CPU {res.cpu_s:.2f} s), peak RSS {res.maxrss_mib:.0f} MiB "
                f"(sampled: anon {res.sampled['RssAnon']:.0f}, "
                f"file {res.sampled['RssFile']:.0f} MiB)"
            )
            if res.io:
                say("   I/O: " + ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in res.io.items()))
            if on_device:
                with contextlib.suppress(ValueError, IndexError, KeyError):
                    stats = json.loads(res.stdout.strip().splitlines()[-1])
                    row.gpu_peak_mib = stats["gpu_peak_bytes"] / MIB
                    say(f"   peak GPU memory allocated {row.gpu_peak_mib:.0f} MiB")
        else:
            row.note = "timeout" if res.timed_out else f"rc={res.rc}"
            warn_block(f"{method}/{tool} failed ({row.note}); stderr tail:", res.stderr_tail)
        rows.append(row)
        return row, res

    floor_row: Row | None = None
    if not args.skip_floor:
        out = run_dir / "out-io-floor"
        floor_cmd = [sys.executable, str(THIS), "_floor", str(out), *map(str, dirs)]
        floor_row, res = measured("io-floor", "floor", floor_cmd)
        if res.ok:
            with contextlib.suppress(ValueError, IndexError):
                stats = json.loads(res.stdout.strip().splitlines()[-1])
                say(
                    f"   read {stats['read_bytes'] / MIB:.0f} MiB, wrote "
                    f"{stats['written_bytes'] / MIB:.0f} MiB, buffer "
                    f"{stats['buffer_bytes'] / MIB:.1f} MiB"
                )
        shutil.rmtree(out, ignore_errors=True)
        if not floor_row.ok:
            floor_row = None
    device_floor_row: Row | None = None
    if on_device and not args.skip_floor:
        out = run_dir / "out-device-floor"
        cmd = [sys.executable, str(THIS), "_device_floor", args.device, str(out), *map(str, dirs)]
        device_floor_row, _res = measured("device-floor", "floor", cmd)
        shutil.rmtree(out, ignore_errors=True)
        if not device_floor_row.ok:
            device_floor_row = None

    ours_failed = False
    for method in args.methods:
        recipe = recipes[method]
        ours_row = mk_row = None
        out_ours, out_mk = run_dir / f"out-{method}-weightsmith", run_dir / f"out-{method}-mergekit"
        if ours_ok:
            cmd = [str(ours_exe), "merge", str(recipe), "--out", str(out_ours)]
            if on_device:
                cmd = [sys.executable, str(THIS), "_ours", args.device, str(recipe), str(out_ours)]
            runs = []
            for _ in range(args.repeats):
                shutil.rmtree(out_ours, ignore_errors=True)
                run, _ = measured(method, "weightsmith", cmd)
                runs.append(run)
                if not run.ok:
                    break
            ours_row = runs[-1]
            if len(runs) > 1 and all(r.ok for r in runs):  # the run of the median wall
                ours_row = sorted(runs, key=lambda r: r.wall_s or 0.0)[len(runs) // 2]
                ours_row.walls_s = [r.wall_s or 0.0 for r in runs]
                rows[:] = [r for r in rows if r is ours_row or all(r is not o for o in runs)]
                say(f"   median of {len(runs)}: {ours_row.wall_s:.2f} s")
            ours_failed |= not ours_row.ok
        if mk_exe is not None and RECIPES[method]["mergekit"]:
            mk_row, _ = measured(method, "mergekit", mergekit_cmd(mk_exe, recipe, out_mk))
        elif mk_exe is not None:
            say(f"-- {method} / mergekit: not in mergekit 0.1.5, no figure")
        for r in (ours_row, mk_row):
            if r is not None and r.ok and floor_row is not None and floor_row.wall_s:
                r.vs_floor = r.wall_s / floor_row.wall_s
            if r is not None and r.ok and device_floor_row and device_floor_row.wall_s:
                r.vs_device_floor = r.wall_s / device_floor_row.wall_s
        if ours_row and mk_row and ours_row.ok and mk_row.ok:
            assert ours_row.wall_s and mk_row.wall_s
            ours_row.vs_mergekit = mk_row.wall_s / ours_row.wall_s
            say(f"-- {method}: comparing outputs (one tensor at a time)")
            proc = run_plain(
                [sys.executable, str(THIS), "_compare", str(out_ours), str(out_mk), str(base)]
            )
            if proc.returncode == 0:
                cmp = json.loads(proc.stdout.strip().splitlines()[-1])
                ours_row.compare = cmp
                ours_row.max_abs_diff = cmp["max_abs_diff"]
                say(
                    f"   {cmp['n_tensors']} tensors, max|diff| {cmp['max_abs_diff']:.3g} "
                    f"({cmp['max_abs_diff_tensor']}), "
                    f"rel. L2 error of the task vector {fmt(cmp['rel_l2_task_vector'], '.3g')}, "
                    f"{cmp['n_different']}/{cmp['n_elements']} elements differ"
                )
                for k in ("only_in_ours", "only_in_mergekit", "shape_mismatch", "dtype_mismatch"):
                    if cmp[k]:
                        say(f"   !! {k}: {cmp[k][:5]}{' ...' if len(cmp[k]) > 5 else ''}")
            else:
                warn_block("comparison failed", tail(proc.stderr))
        if not args.keep_outputs:
            shutil.rmtree(out_ours, ignore_errors=True)
            shutil.rmtree(out_mk, ignore_errors=True)

    rss_budget = RSS_BUDGET_MIB + 4 * largest_mib
    say()
    say(
        f"== results: {args.size_gb:g} GB model, {input_bytes / MIB:.0f} MiB of inputs "
        f"({len(dirs)} models), {os.cpu_count()} CPUs, merges on {args.device}"
    )
    print_table(rows, on_device)
    say()
    say("notes:")
    if input_bytes < 0.5 * _memory_bytes():
        say(
            "  - inputs are in the page cache for every run (warm-up read first); wall = child wall"
        )
    else:
        say("  - inputs are larger than half the RAM: runs re-read them from disk (see the")
        say("    read_bytes column), so walls include disk reads; wall = child wall")
    say("    + os.sync() right after it (outputs on disk); in MiB/s = all input bytes / wall")
    say(
        "  - x mergekit = mergekit wall / ours (>1: we are faster); x floor = wall / I/O floor wall"
    )
    if on_device:
        say("  - x dev floor = wall / the floor with the GPU's transfers (device-floor row: the")
        say("    I/O floor's reads into pinned buffers, copied to the GPU and the base back);")
        say("    GPU peak MiB = torch.cuda.max_memory_allocated of the child")
    say("  - max|diff| vs mk: max |ours - mergekit| over all tensors; (%) = relative L2 error of")
    say("    the merged task vector, ||ours - mk|| / ||mk - base||. ties/breadcrumbs keep the")
    say("    top-k |delta|; fp16 deltas tie a lot at the cut-off, so which tied entries survive")
    say("    depends on sort order (mergekit vs itself on permuted elements: 7-12%): judge those")
    say("    by the % figure; task_arithmetic should be at fp16 rounding (~1-2%). Whether the")
    say("    math agrees is shown by the compatibility check (float32, ties set apart) below")
    say(
        f"  - peak RSS = ru_maxrss of the child (os.wait4); spawning /bin/true from here "
        f"reports {rss0:.0f} MiB, included in every figure"
    )
    say("  - anon MiB = peak RssAnon of the child's process tree, sampled every 20 ms: memory")
    say("    it owns, without the page-cache pages of mmap'd inputs that ru_maxrss also counts")
    say("  - read/written MiB: the child's /proc/<pid>/io when it exited (its children included):")
    say("    rchar/wchar = bytes through read/write system calls (page-cache hits included;")
    say("    reads of mmap'd files, as mergekit's, NOT counted); disk = read_bytes/write_bytes,")
    say("    what reached storage (mmap faults included; inputs already cached NOT counted)")
    say("targets (information, not asserted):")
    by = {(r.method, r.tool): r for r in rows}
    ours_rows = [r for r in rows if r.tool == "weightsmith"]
    if not ours_rows:
        say("  - (no weightsmith rows)")
    for r in ours_rows:
        if r.peak_rss_mib is not None and r.ok:
            mark = "met" if r.peak_rss_mib <= rss_budget else "MISSED"
            say(
                f"  - {r.method}: peak RSS {r.peak_rss_mib:.0f} MiB <= {rss_budget:.0f} MiB "
                f"(1 GiB + 4 x largest tensor {largest_mib:.0f} MiB): {mark}"
            )
    for method, target in SPEED_TARGETS.items():
        r = by.get((method, "weightsmith"))
        if r is not None and r.vs_mergekit is not None:
            mark = "met" if r.vs_mergekit >= target else "MISSED"
            say(f"  - {method}: {r.vs_mergekit:.2f}x mergekit's speed, target >= {target}x: {mark}")
    for method, target in FLOOR_TARGETS.items():
        r = by.get((method, "weightsmith"))
        if r is not None and r.vs_floor is not None:
            mark = "met" if r.vs_floor <= target else "MISSED"
            say(f"  - {method}: {r.vs_floor:.2f}x the I/O floor, target <= {target}x: {mark}")
    if on_device:
        for r in ours_rows:
            if r.ok and r.vs_floor is not None:
                mark = "met" if r.vs_floor <= DEVICE_FLOOR_TARGET else "MISSED"
                say(
                    f"  - {r.method} on {args.device}: {r.vs_floor:.2f}x this machine's I/O "
                    f"floor, target <= {DEVICE_FLOOR_TARGET}x: {mark}"
                )
    linear = by.get(("linear", "weightsmith"))
    for method, target in LINEAR_TARGETS.items():
        r = by.get((method, "weightsmith"))
        if linear is None or not linear.ok or r is None or not r.ok:
            continue
        assert r.wall_s and linear.wall_s and r.cpu_s is not None and linear.cpu_s
        ratio = r.wall_s / linear.wall_s
        mark = "met" if ratio <= target else "MISSED"
        median = " (medians)" if r.walls_s and linear.walls_s else ""
        say(
            f"  - {method}: {ratio:.2f}x linear's wall in this run{median} "
            f"(CPU {r.cpu_s / linear.cpu_s:.2f}x), target <= {target}x: {mark}"
        )
    say("  - RSS independent of model size: compare peak RSS across --size-gb runs")

    compat: dict[str, Any] | None = None
    if args.skip_compat:
        say("\n-- compatibility check skipped (--skip-compat)")
    elif on_device:
        say(
            f"\n-- compatibility check skipped: it runs on the CPU, not with --device {args.device}"
        )
    elif not ours_ok or mk_exe is None:
        say("\n-- compatibility check skipped: it needs both weightsmith and mergekit")
    else:
        compat = run_compat(
            data_dir,
            args.compat_size_gb,
            args.seed,
            args.compat_methods,
            ours_exe,
            mk_exe,
            args.timeout,
            args.keep_outputs,
        )

    result_path = data_dir / "results-merge.json"
    doc = {
        "size_gb": args.size_gb,
        "preset": args.preset,
        "n_finetunes": args.finetunes,
        "device": args.device,
        "gpu": found,
        "shape": asdict(shape),
        "n_params": n_params,
        "n_tensors": len(specs),
        "largest_tensor_mib": largest_mib,
        "input_bytes": input_bytes,
        "n_models": len(dirs),
        "methods": args.methods,
        "recipes": {m: RECIPES[m] for m in args.methods},
        "baseline_child_rss_mib": rss0,
        "rss_budget_mib": rss_budget,
        "targets": {
            "speed_vs_mergekit": SPEED_TARGETS,
            "wall_vs_floor": FLOOR_TARGETS,
            "wall_vs_linear": LINEAR_TARGETS,
            "rss_budget_mib": rss_budget,
            **({"device_wall_vs_floor": DEVICE_FLOOR_TARGET} if on_device else {}),
        },
        "host": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "weightsmith": str(ours_exe) if ours_ok else None,
        "mergekit": str(mk_exe) if mk_exe else None,
        "rows": [asdict(r) for r in rows],
        "compat": compat,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    result_path.write_text(json.dumps(doc, indent=2) + "\n")
    say(f"\nwrote {result_path}")
    if args.preset and not args.keep_models:  # tens of GB: not cached unless asked for
        shutil.rmtree(base.parent, ignore_errors=True)
        say(f"deleted the generated models in {base.parent} (--keep-models keeps them)")
    status = 0
    if ours_failed:
        say("some weightsmith runs FAILED")
        status = 1
    if compat is not None and not compat["all_match"]:
        say("the compatibility check found differences away from tie positions (see above)")
        status = 1
    return status


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_gen":
        sys.exit(child_generate(sys.argv[2]))
    if len(sys.argv) > 1 and sys.argv[1] == "_floor":
        sys.exit(child_io_floor(*sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "_device_floor":
        sys.exit(child_device_floor(*sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "_ours":
        sys.exit(child_ours_on_device(*sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "_compare":
        sys.exit(child_compare(sys.argv[2], sys.argv[3], sys.argv[4]))
    if len(sys.argv) > 1 and sys.argv[1] == "_compat":
        sys.exit(child_compat_compare(sys.argv[2]))
    sys.exit(main(sys.argv[1:]))
