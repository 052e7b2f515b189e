"""MoE assembly: dense fine-tunes of one base as the experts of a mixture-of-experts model, one
tensor at a time — Llama/Mistral → Mixtral (mergekit/moe/mixtral.py), Qwen2 → Qwen2-MoE
(mergekit/moe/qwen.py).

- Every tensor but the MLPs comes from ``base_model`` (attention and its Qwen2 biases, norms,
  embeddings, lm_head), cast to the output dtype.
- Layer l's MLP of expert e comes from ``experts[e].source_model``. Mixtral: ``mlp.gate_proj``
  → ``block_sparse_moe.experts.e.w1``, ``mlp.up_proj`` → ``…w3``, ``mlp.down_proj`` →
  ``…w2`` (Mixtral's layout on the Hub, which transformers, vLLM and llama.cpp read).
  Qwen2-MoE: ``mlp.experts.e.<proj>``, and the shared expert's MLP ``mlp.shared_expert.<proj>``.
- Layer l's router (Mixtral ``block_sparse_moe.gate.weight``, Qwen2-MoE ``mlp.gate.weight``;
  experts × hidden) is row e = expert e's vector from workers/moe/router.py (``gate_mode``);
  Qwen2-MoE's ``mlp.shared_expert_gate.weight`` (1 × hidden) is the shared expert's vector.
  They are written before the layer's experts.
- ``config.json`` is the base's as a MixtralConfig / Qwen2MoeConfig (experts,
  ``num_experts_per_tok`` = ``experts_per_token``, no sliding window; Qwen2-MoE: every layer
  sparse, expert and shared-expert sizes = the dense intermediate_size, normalised top-k);
  the base's tokenizer and generation config are copied.

Checked before anything is written, each error naming the field, model and tensor: the base
is Llama, Mistral or Qwen2 (the supported ones are listed otherwise), shared_experts fits the
output (none for Mixtral, exactly one for Qwen2-MoE), every expert has the base's model_type
and its MLP tensors the base's shapes, no tensor is one the output has no place for (a bias
Mixtral lacks). Memory: one tensor at a time, plus the base model once for ``gate_mode hidden``.
Output: shards + index, config, tokenizer, a model card and the manifest (last), with the
routers' condition numbers per layer. On any failure nothing is left in ``out_dir``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

import weightsmith
from schemas.moe_recipe import HIDDEN_MODES, OUTPUT_ARCHITECTURES, SHARED_EXPERTS, MoeRecipe
from schemas.references import ModelReference, ReferenceKind
from workers.errors import CancelledError, InputError
from workers.merge.inputs import TensorSource, open_reference, read_config
from workers.merge.progress import Progress, ProgressCallback
from workers.moe import router
from workers.publish.output import (
    adapter_parents,
    copy_tokenizer,
    manifest_parent,
    write_output_manifest,
)
from workers.sources import ResolvedModel, SourceSettings
from workers.tensors.writer import ShardedWriter, TensorSpec

__all__ = ["MoeResult", "run_moe"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MLP = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+))\.mlp\.(?P<proj>\w+)\.(?P<kind>\w+)$")
_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_DEGENERATE_CONDITION = 5.0  # mergekit's warning threshold (warn_degenerate_gates)


@dataclass
class MoeResult:
    out_dir: Path
    seed: int
    manifest: dict[str, Any]
    metrics: dict[str, Any]


@dataclass
class _Opened:
    role: str  # "base_model" or "experts[i].source_model"
    resolved: ResolvedModel
    reader: TensorSource
    adapter: ResolvedModel | None
    label: str
    config: dict[str, Any]


def _open(
    role: str,
    ref: ModelReference,
    settings: SourceSettings,
    base_dir: Path | None,
    resolved: dict[str, ResolvedModel],
) -> _Opened:
    r, reader, adapter = open_reference(ref, settings, base_dir, resolved, label=str(ref))
    try:
        config = read_config(r.path)
    except BaseException:
        reader.close()
        raise
    return _Opened(role, r, reader, adapter, str(ref), config)


@dataclass(frozen=True)
class _Layout:
    """Where the MoE parts of layer ``prefix`` (``model.layers.N``) go in one architecture."""

    architecture: str
    router: str  # the router's name, formatted with prefix
    expert: str  # an expert's MLP weight, formatted with prefix, e (index) and proj
    shared: str | None  # the shared expert's MLP weight (prefix, proj)
    shared_router: str | None  # its sigmoid gate (prefix)
    biases: bool  # whether the architecture has the attention biases the input may have

    def expert_name(self, prefix: str, e: int, proj: str) -> str:
        return self.expert.format(prefix=prefix, e=e, proj=proj, w=_EXPERT_NAMES[proj])


_LAYOUTS = {
    # Mixtral's layout on the Hub (mergekit/moe/mixtral.py), which transformers, vLLM and
    # llama.cpp read: w1 = gate_proj, w3 = up_proj, w2 = down_proj
    "Mixtral": _Layout(
        "Mixtral",
        router="{prefix}.block_sparse_moe.gate.weight",
        expert="{prefix}.block_sparse_moe.experts.{e}.{w}.weight",
        shared=None,
        shared_router=None,
        biases=False,
    ),
    # Qwen2-MoE (mergekit/moe/qwen.py): the experts keep the dense MLP's names
    "Qwen2-MoE": _Layout(
        "Qwen2-MoE",
        router="{prefix}.mlp.gate.weight",
        expert="{prefix}.mlp.experts.{e}.{proj}.weight",
        shared="{prefix}.mlp.shared_expert.{proj}.weight",
        shared_router="{prefix}.mlp.shared_expert_gate.weight",
        biases=True,
    ),
}


@dataclass(frozen=True)
class _Planned:
    """One output tensor and where it comes from (no source: a router of ``layer``, its rows
    ``rows`` of the gate vectors)."""

    name: str
    source: _Opened | None
    source_name: str
    layer: int
    rows: tuple[int, int] = (0, 0)


def _expert_tensor(expert: _Opened, base: _Opened, name: str) -> None:
    """The expert has the base's MLP tensor ``name`` with the same shape, as a float."""
    if name not in expert.reader:
        raise InputError(
            f"the expert lacks the base's MLP tensor {name!r}; experts must be fine-tunes of "
            "the base (same architecture)",
            field=expert.role,
            model=expert.label,
            tensor=name,
        )
    got, want = expert.reader.info(name).shape, base.reader.info(name).shape
    if got != want:
        raise InputError(
            f"shape {tuple(got)} differs from the base's {tuple(want)}; experts must have the "
            "base's MLP shapes (the same intermediate_size and hidden_size)",
            field=expert.role,
            model=expert.label,
            tensor=name,
        )
    if not expert.reader.info(name).torch_dtype.is_floating_point:
        raise InputError("not a float tensor", field=expert.role, model=expert.label, tensor=name)


def _plan(
    layout: _Layout, base: _Opened, experts: list[_Opened], shared: list[_Opened]
) -> list[_Planned]:
    """The output tensors in order: the base's, each layer's MLP replaced by the router(s)
    and every expert's MLP. Checks every expert's MLP tensor against the base's shape."""
    plan: list[_Planned] = []
    routed: set[int] = set()
    projs: dict[str, set[str]] = {}  # layer prefix → the MLP weights the base has
    n = len(experts)
    for name in base.reader.names:
        if name.endswith(".bias") and not (layout.biases and ".self_attn." in name):
            raise InputError(
                f"{layout.architecture} has no bias terms here; a base with such biases "
                "(attention_bias or mlp_bias set) cannot be assembled into one",
                field="base_model",
                model=base.label,
                tensor=name,
            )
        m = _MLP.match(name)
        if m is None:
            if ".mlp." in name:
                raise InputError(
                    "not a tensor of a dense MLP (gate_proj, up_proj, down_proj)",
                    field="base_model",
                    model=base.label,
                    tensor=name,
                )
            plan.append(_Planned(name, base, name, -1))
            continue
        prefix, proj, layer = m["prefix"], m["proj"], int(m["layer"])
        if proj not in _EXPERT_NAMES or m["kind"] != "weight":
            raise InputError(
                f"{proj}.{m['kind']} is not a dense MLP weight (gate_proj, up_proj, down_proj)",
                field="base_model",
                model=base.label,
                tensor=name,
            )
        projs.setdefault(prefix, set()).add(proj)
        if layer not in routed:
            routed.add(layer)
            plan.append(_Planned(layout.router.format(prefix=prefix), None, "", layer, (0, n)))
            if layout.shared_router is not None:
                gate = layout.shared_router.format(prefix=prefix)
                plan.append(_Planned(gate, None, "", layer, (n, n + len(shared))))
        for e, expert in enumerate(experts):
            _expert_tensor(expert, base, name)
            plan.append(_Planned(layout.expert_name(prefix, e, proj), expert, name, layer))
        for s in shared:
            assert layout.shared is not None  # _check_architectures: no shared experts else
            _expert_tensor(s, base, name)
            plan.append(_Planned(layout.shared.format(prefix=prefix, proj=proj), s, name, layer))
    for prefix, have in projs.items():
        for proj in sorted(set(_EXPERT_NAMES) - have):
            raise InputError(
                "the base lacks this MLP weight of a layer it has the others of; every layer "
                "needs gate_proj, up_proj and down_proj",
                field="base_model",
                model=base.label,
                tensor=f"{prefix}.mlp.{proj}.weight",
            )
    if not routed:
        raise InputError(
            "the base has no MLP tensors 'model.layers.N.mlp.gate_proj/up_proj/down_proj"
            ".weight': it is not a Llama, Mistral or Qwen2 checkpoint",
            field="base_model",
            model=base.label,
        )
    return plan


def _check_architectures(base: _Opened, experts: list[_Opened], shared: list[_Opened]) -> _Layout:
    model_type = base.config.get("model_type")
    if model_type not in OUTPUT_ARCHITECTURES:
        supported = ", ".join(f"{k} (→ {v})" for k, v in OUTPUT_ARCHITECTURES.items())
        raise InputError(
            f"model_type {model_type!r} cannot be assembled into a MoE; supported: {supported}",
            field="base_model",
            model=base.label,
        )
    architecture = OUTPUT_ARCHITECTURES[model_type]
    for e in (*experts, *shared):
        if e.config.get("model_type") != model_type:
            raise InputError(
                f"model_type {e.config.get('model_type')!r} differs from the base's "
                f"{model_type!r}; every expert must be a fine-tune of the base",
                field=e.role,
                model=e.label,
            )
    want = SHARED_EXPERTS[architecture]
    if len(shared) != want:
        need = (
            "exactly one shared expert (used by every token, gated by its own router): give "
            "shared_experts: [{source_model, positive_prompts}]"
            if want
            else "no shared expert: leave shared_experts out"
        )
        raise InputError(
            f"{model_type} inputs make a {architecture}, which has {need}",
            field="shared_experts",
            model=base.label,
        )
    return _LAYOUTS[architecture]


def _output_dtype(recipe: MoeRecipe, base: _Opened) -> str:
    if recipe.dtype:
        return recipe.dtype
    declared = base.config.get("dtype") or base.config.get("torch_dtype")
    if declared in _DTYPES:
        return str(declared)
    for name in base.reader.names:
        stored = base.reader.info(name).torch_dtype
        for k, v in _DTYPES.items():
            if stored == v:
                return k
    return "float32"


def output_config(
    layout: _Layout, base_config: dict[str, Any], recipe: MoeRecipe, dtype: str
) -> dict[str, Any]:
    """config.json of the output: the base's (Llama, Mistral or Qwen2) as a MixtralConfig or
    a Qwen2MoeConfig, as mergekit-moe writes them."""
    from transformers import MixtralConfig, Qwen2MoeConfig

    src = {k: v for k, v in base_config.items() if k not in ("architectures", "model_type")}
    if layout.architecture == "Mixtral":
        cfg: Any = MixtralConfig(**src)
        cfg.architectures = ["MixtralForCausalLM"]
        cfg.num_local_experts = len(recipe.experts)
    else:
        for key in ("layer_types", "max_window_layers"):  # recomputed: every layer full
            src.pop(key, None)
        src["use_sliding_window"] = False
        cfg = Qwen2MoeConfig(**src)
        cfg.architectures = ["Qwen2MoeForCausalLM"]
        cfg.num_experts = len(recipe.experts)
        cfg.decoder_sparse_step = 1  # every layer a MoE layer
        cfg.mlp_only_layers = []
        cfg.norm_topk_prob = True
        cfg.moe_intermediate_size = cfg.intermediate_size  # the experts are the dense MLPs
        cfg.shared_expert_intermediate_size = cfg.intermediate_size
    cfg.num_experts_per_tok = recipe.experts_per_token
    cfg.sliding_window = None
    data = cfg.to_dict()
    data["dtype"] = dtype
    data.pop("torch_dtype", None)
    return dict(data)


def run_moe(
    recipe: MoeRecipe,
    out_dir: Path,
    *,
    device: str = "cpu",
    sources: SourceSettings | None = None,
    base_dir: Path | None = None,
    progress: ProgressCallback | None = None,
    cancelled: Callable[[], bool] | None = None,
    resolved: dict[str, ResolvedModel] | None = None,
    started: float | None = None,
) -> MoeResult:
    """Assemble the MoE per ``recipe`` into ``out_dir`` (which must not exist or be empty);
    on any failure nothing is left there. ``resolved``: references already fetched (the
    service's worker); ``started``: ``time.perf_counter()`` when the work began."""
    from workers.devices import resolve_device
    from workers.publish.output import StagedOutput

    t0 = time.perf_counter() if started is None else started
    out_dir = Path(out_dir)
    output = StagedOutput(out_dir)
    staging = output.path
    dev = resolve_device(device)
    settings = sources or SourceSettings()
    report = progress or (lambda _p: None)
    is_cancelled = cancelled or (lambda: False)
    opened: list[_Opened] = []
    try:
        report(Progress("resolve", 0, 0, 0, 0))
        base = _open("base_model", recipe.base_model, settings, base_dir, resolved or {})
        opened.append(base)
        experts = []
        for i, e in enumerate(recipe.experts):
            role = f"experts[{i}].source_model"
            experts.append(_open(role, e.source_model, settings, base_dir, resolved or {}))
            opened.append(experts[-1])
        shared = []
        for i, e in enumerate(recipe.shared_experts or []):
            role = f"shared_experts[{i}].source_model"
            shared.append(_open(role, e.source_model, settings, base_dir, resolved or {}))
            opened.append(shared[-1])
        timings = {"resolve_s": time.perf_counter() - t0}
        layout = _check_architectures(base, experts, shared)
        dtype_name = _output_dtype(recipe, base)
        dtype = _DTYPES[dtype_name]
        plan = _plan(layout, base, experts, shared)
        assembly = _Assembly(recipe, base, plan, dtype, report, is_cancelled)
        t1 = time.perf_counter()
        gates = assembly.routers(dev)
        timings["router_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        staging.mkdir(parents=True)
        assembly.write(staging, gates)
        timings["assemble_s"] = time.perf_counter() - t2
        report(Progress("publish", *assembly.counts()))
        t3 = time.perf_counter()
        config = output_config(layout, base.config, recipe, dtype_name)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        base_folder = (
            base.resolved.path if base.resolved.path.is_dir() else base.resolved.path.parent
        )
        gen = base_folder / "generation_config.json"
        if gen.is_file():
            shutil.copyfile(gen, staging / gen.name)
        tokenizer_files = copy_tokenizer(base.resolved.path, staging)
        metrics = _metrics(recipe, gates, layout.architecture, dtype_name)
        (staging / "README.md").write_text(_model_card(recipe, base, experts, shared, metrics))
        timings["publish_s"] = time.perf_counter() - t3
        timings["total_s"] = time.perf_counter() - t0
        manifest = _write_manifest(
            staging, recipe, base, experts, shared, metrics, timings, tokenizer_files,
            assembly.digests,
        )  # fmt: skip
        output.publish()
        return MoeResult(out_dir, recipe.seed, manifest, manifest["metrics"])
    except BaseException:
        output.discard()
        raise
    finally:
        for o in opened:
            o.reader.close()


class _Assembly:
    """The routers, then the streaming pass that writes every output tensor."""

    def __init__(
        self,
        recipe: MoeRecipe,
        base: _Opened,
        plan: list[_Planned],
        dtype: torch.dtype,
        report: ProgressCallback,
        is_cancelled: Callable[[], bool],
    ) -> None:
        self.recipe = recipe
        self.base = base
        self.plan = plan
        self.dtype = dtype
        self.report = report
        self.is_cancelled = is_cancelled
        self.layers = 1 + max(p.layer for p in plan)
        # the routers' width: the hidden size, the columns of gate_proj (hidden → intermediate)
        gate_proj = next(n for n in base.reader.names if n.endswith("mlp.gate_proj.weight"))
        self.hidden = int(base.reader.info(gate_proj).shape[1])
        self.prompts = (
            router.prompt_count(recipe) if recipe.gate_mode in HIDDEN_MODES else 0
        )  # forward passes, counted as "tensors" of the router phase
        self.total = self.prompts + len(plan)
        self.bytes_total = sum(
            p.source.reader.info(p.source_name).nbytes for p in plan if p.source is not None
        )
        self.done = 0
        self.bytes_done = 0
        self.digests: dict[str, tuple[int, str]] = {}

    def counts(self) -> tuple[int, int, int, int]:
        return self.done, self.total, self.bytes_done, self.bytes_total

    def _check_cancel(self) -> None:
        if self.is_cancelled():
            raise CancelledError("the job was cancelled")

    def routers(self, device: torch.device) -> torch.Tensor:
        r = self.recipe
        self.report(Progress("router", *self.counts()))
        if r.gate_mode == "random":
            return router.random_gates(r, self.layers, self.hidden)
        tokenizer = router.load_tokenizer(self.base.resolved.path, self.base.label)
        if r.gate_mode == "cheap_embed":
            return router.cheap_embed_gates(r, tokenizer, self.base.reader, self.layers)

        def prompt_done() -> None:
            self.done += 1
            self.report(Progress("router", *self.counts()))

        return router.hidden_gates(
            r,
            tokenizer,
            self.base.resolved.path,
            self.base.label,
            self.layers,
            device,
            self.is_cancelled,
            prompt_done,
        )

    def write(self, staging: Path, gates: torch.Tensor) -> None:
        specs = []
        for p in self.plan:
            if p.source is None:
                rows = p.rows[1] - p.rows[0]
                specs.append(TensorSpec(p.name, self.dtype, (rows, self.hidden)))
                continue
            info = p.source.reader.info(p.source_name)
            # float tensors take the output dtype; others (none in these models) keep theirs
            stored = info.torch_dtype
            specs.append(
                TensorSpec(p.name, self.dtype if stored.is_floating_point else stored, info.shape)
            )
        writer = ShardedWriter(staging, specs)
        try:
            for p, spec in zip(self.plan, specs, strict=True):
                self._check_cancel()
                if p.source is None:
                    gate = gates[p.layer, p.rows[0] : p.rows[1]]
                    writer.write(p.name, gate.to(spec.dtype).contiguous())
                else:
                    t = p.source.reader.read(p.source_name)
                    writer.write(p.name, t.to(spec.dtype).contiguous())
                    self.bytes_done += p.source.reader.info(p.source_name).nbytes
                self.done += 1
                self.report(Progress("assemble", *self.counts()))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        self.digests = writer.digests


def _metrics(
    recipe: MoeRecipe, gates: torch.Tensor, architecture: str, dtype: str
) -> dict[str, Any]:
    cond = router.condition_numbers(gates[:, : len(recipe.experts)])  # the routers' rows
    degenerate = [i for i, c in enumerate(cond) if not c < _DEGENERATE_CONDITION]
    return {
        "architecture": architecture,
        "num_local_experts": len(recipe.experts),
        "shared_experts": len(recipe.shared_experts or []),
        "num_experts_per_tok": recipe.experts_per_token,
        "gate_mode": recipe.gate_mode,
        "dtype": dtype,
        "router_condition_numbers": [c if math.isfinite(c) else None for c in cond],
        "degenerate_router_layers": degenerate,
    }


def _label(r: ResolvedModel) -> str:
    p = r.pinned
    return p.location if p.kind is ReferenceKind.HUB else str(p)


def _model_card(
    recipe: MoeRecipe,
    base: _Opened,
    experts: list[_Opened],
    shared: list[_Opened],
    metrics: dict[str, Any],
) -> str:
    front = {
        "base_model": _label(base.resolved),
        "library_name": "transformers",
        "tags": ["moe", metrics["architecture"].lower(), "weightsmith"],
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {recipe.output.name or 'Mixture of experts over ' + base.label}",
        "",
        f"A {metrics['architecture']} mixture of {len(experts)} experts "
        f"({recipe.experts_per_token} per token) assembled by weightsmith "
        f"{weightsmith.__version__}: attention, norms and embeddings from `{base.label}`, "
        f"routers from gate_mode `{recipe.gate_mode}`.",
        "",
        *[f"- expert {i}: `{e.label}`" for i, e in enumerate(experts)],
        *[f"- shared expert: `{e.label}`" for e in shared],
        "",
    ]
    if metrics["degenerate_router_layers"]:
        lines += [
            f"Layers {metrics['degenerate_router_layers']} have nearly parallel router rows "
            "(condition number ≥ 5): their experts' prompts are too alike, some experts will "
            "be used little.",
            "",
        ]
    return "\n".join(lines)


def _write_manifest(
    staging: Path,
    recipe: MoeRecipe,
    base: _Opened,
    experts: list[_Opened],
    shared: list[_Opened],
    metrics: dict[str, Any],
    timings: dict[str, float],
    tokenizer_files: list[str],
    digests: dict[str, tuple[int, str]],
) -> dict[str, Any]:
    parents = [manifest_parent("base", base.resolved)]
    parents += [manifest_parent("expert", e.resolved, expert=i) for i, e in enumerate(experts)]
    parents += [manifest_parent("shared_expert", e.resolved) for e in shared]
    parents += adapter_parents((o.resolved, o.adapter) for o in (base, *experts, *shared))
    return write_output_manifest(
        staging,
        kind="moe",
        name=recipe.output.name or f"MoE of {len(experts)} experts over {base.label}",
        recipe=recipe,
        seed=recipe.seed,
        parents=parents,
        metrics=metrics,
        timings=timings,
        known=digests,
        tokenizer_files=tokenizer_files,
    )
