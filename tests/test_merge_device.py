"""Merges on a GPU: the staged pipeline of workers/merge/transfer.py (pinned buffers, copies
on streams of their own, the writer writing while the next tensor computes).

Without a GPU the same pipeline runs on the CPU (``CPU_STAGING``) with the tiniest ring (two
buffers of 1000 bytes each way, so every tensor goes through them in many parts and each
buffer is reused hundreds of times) and copies that are made only when someone waits for
them: a buffer refilled before its copy was waited for gives a wrong tensor every time. Its
output must be the plain path's, byte for byte, for every method family. The tests marked
``gpu`` (skipped where torch sees no CUDA GPU) run the merges on the GPU and compare them
with the independent reference merge and with the CPU's.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from schemas.recipe import parse_recipe
from tests.support.merge_cases import (
    ATOL,
    BF16_CASES,
    LLAMA_CASES,
    RTOL,
    SEED,
    SMALL_CASES,
    assert_matches_reference,
    engine,
    load_output,
    models,
    recipe,
)
from tests.support.reference_merge import reference_merge
from workers.merge import blocks, transfer
from workers.merge.engine import run_merge
from workers.merge.transfer import DeviceTransfer, Staging
from workers.tensors.writer import PendingHost, ShardedWriter, TensorSpec

# every family: element-wise (linear, task_arithmetic), TIES' top-k (per tensor and over the
# whole model), Breadcrumbs' rank band, DARE and DELLA's seeded draws, PCB's whole-model
# statistics, and the whole-tensor methods (slerp, model_stock)
FAMILIES = [
    "linear",
    "task_arithmetic",
    "ties",
    "ties_global",
    "breadcrumbs",
    "dare_ties",
    "dare_linear",
    "della",
    "pcb",
    "slerp",
    "model_stock",
]


def ring_of_two(read_ahead_blocks: int) -> Staging:
    return Staging(
        in_slots=2,
        out_slots=2,
        slot_bytes=1000,  # 250 float32: the 256×64 embedding goes through in 66 parts
        block_elements=None,  # blocks.BLOCK_ELEMENTS, made small below
        read_ahead_blocks=read_ahead_blocks,
    )


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streamed tensors in many blocks of an odd size (blocks end inside rows)."""
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 4093)


class TransferSpy:
    """Records the transfers the merges make and how much they copy."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.made: list[DeviceTransfer] = []
        self.uploads = self.downloads = 0
        make = DeviceTransfer.for_device.__func__  # type: ignore[attr-defined]
        upload, upload_from = DeviceTransfer.upload, DeviceTransfer.upload_from
        download = DeviceTransfer.download

        def for_device(cls: type[DeviceTransfer], device: torch.device) -> DeviceTransfer:
            t = make(cls, device)
            self.made.append(t)
            return t

        def counted_upload(t: DeviceTransfer, *args: Any) -> Any:
            self.uploads += 1
            return upload(t, *args)

        def counted_upload_from(t: DeviceTransfer, *args: Any) -> Any:
            self.uploads += 1
            return upload_from(t, *args)

        def counted_download(t: DeviceTransfer, *args: Any) -> Any:
            self.downloads += 1
            return download(t, *args)

        monkeypatch.setattr(DeviceTransfer, "for_device", classmethod(for_device))
        monkeypatch.setattr(DeviceTransfer, "upload", counted_upload)
        monkeypatch.setattr(DeviceTransfer, "upload_from", counted_upload_from)
        monkeypatch.setattr(DeviceTransfer, "download", counted_download)


def file_digests(out_dir: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out_dir.glob("*.safetensors"))
    }


# ---- the staged pipeline on the CPU ---------------------------------------------------------


@pytest.mark.parametrize("read_ahead_blocks", [0, 1])
@pytest.mark.parametrize("case", FAMILIES)
def test_the_staged_pipeline_writes_the_plain_paths_bytes(
    case, read_ahead_blocks, llama_family, small_blocks, monkeypatch, tmp_path
):
    r = LLAMA_CASES[case](llama_family)
    _, plain = engine(r, tmp_path / "plain", seed=SEED)
    spy = TransferSpy(monkeypatch)
    staging = ring_of_two(read_ahead_blocks)
    monkeypatch.setattr(transfer, "CPU_STAGING", staging)
    _, staged = engine(r, tmp_path / "staged", seed=SEED)

    (t,) = spy.made
    assert t.staged and not t.pinned
    assert spy.uploads > len(plain) and spy.downloads >= len(plain)  # it did go through it
    # the rings were made once, whatever the number of tensors and parts
    assert t.host_bytes <= (staging.in_slots + staging.out_slots) * staging.slot_bytes
    assert file_digests(tmp_path / "staged") == file_digests(tmp_path / "plain")
    assert set(staged) == set(plain)
    for name in plain:
        assert torch.equal(staged[name], plain[name]), name
    assert_matches_reference(staged, reference_merge(r, SEED), out_dir=tmp_path / "staged")


def _vocabulary_recipe(f: dict[str, Path]) -> dict[str, Any]:
    """task_arithmetic onto the union of two vocabularies: the embedding and head rows are
    aligned to it on the host, then staged like any tensor."""
    return recipe(
        "task_arithmetic",
        f,
        models(f, "ft1", "alt", params=[{"weight": 0.5}, {"weight": 0.3}]),
        tokenizer_source="union",
    )


OTHER_LAYOUTS = [
    # 2-byte inputs through byte buffers, float32 out; ties and PCB streamed in blocks
    *[("bf16_llama_family", BF16_CASES[c]) for c in ("ties", "ties_global", "dare_ties", "pcb")],
    # inputs in several shards of different sizes
    *[("sharded_llama_family", SMALL_CASES[c]) for c in ("ties", "slerp", "task_arithmetic")],
    ("vocabulary_family", _vocabulary_recipe),
]


@pytest.fixture
def vocabulary_family(llama_family, llama_alt_tokenizer):
    return {**llama_family, "alt": llama_alt_tokenizer}


@pytest.mark.parametrize(
    ("family", "make"),
    OTHER_LAYOUTS,
    ids=["bf16-ties", "bf16-ties_global", "bf16-dare_ties", "bf16-pcb", "sharded-ties",
         "sharded-slerp", "sharded-task_arithmetic", "vocabulary-union"],
)  # fmt: skip
def test_the_staged_pipeline_writes_the_plain_paths_bytes_for_other_inputs(
    family, make, small_blocks, request, monkeypatch, tmp_path
):
    r = make(request.getfixturevalue(family))
    _, plain = engine(r, tmp_path / "plain", seed=SEED)
    spy = TransferSpy(monkeypatch)
    monkeypatch.setattr(transfer, "CPU_STAGING", ring_of_two(1))
    engine(r, tmp_path / "staged", seed=SEED)
    assert spy.uploads > len(plain) and spy.downloads >= len(plain)
    assert file_digests(tmp_path / "staged") == file_digests(tmp_path / "plain")


@pytest.mark.parametrize("case", ["slerp", "dare_ties", "model_stock"])
def test_a_buffer_refilled_before_its_copy_finished_would_be_caught(
    case, llama_family, small_blocks, monkeypatch, tmp_path
):
    """The check above can fail: without the wait before a ring buffer is refilled, the
    deferred copies read the next part's bytes and the output is wrong."""
    r = LLAMA_CASES[case](llama_family)
    engine(r, tmp_path / "plain", seed=SEED)
    monkeypatch.setattr(transfer, "CPU_STAGING", ring_of_two(1))
    monkeypatch.setattr(DeviceTransfer, "before_fill", lambda self, host: None)
    try:
        engine(r, tmp_path / "staged", seed=SEED)
    except Exception as e:  # a garbled input may also be refused (NaN, overflow)
        assert "NaN" in str(e) or "overflow" in str(e) or "infinite" in str(e), e
        return
    assert file_digests(tmp_path / "staged") != file_digests(tmp_path / "plain")


def test_random_draws_are_made_on_the_cpu_whatever_the_device(llama_family, monkeypatch, tmp_path):
    """DARE's keep masks come from a CPU generator per (seed, model, tensor), whatever the
    compute device: a staged run keeps exactly the entries the plain run keeps, and a
    kept entry of model j's task vector is kept with the probability asked for."""
    r = recipe(
        "dare_linear",
        llama_family,
        models(llama_family, "ft1"),
        {"density": 0.25, "rescale": False, "normalize": False},
    )
    _, plain = engine(r, tmp_path / "plain", seed=SEED)
    monkeypatch.setattr(transfer, "CPU_STAGING", ring_of_two(1))
    _, staged = engine(r, tmp_path / "staged", seed=SEED)
    base_t = load_file(str(llama_family["base"] / "model.safetensors"))
    ft1 = load_file(str(llama_family["ft1"] / "model.safetensors"))
    name = "model.embed_tokens.weight"
    changed = ft1[name] != base_t[name]
    kept_plain = (plain[name] != base_t[name]) & changed
    kept_staged = (staged[name] != base_t[name]) & changed
    assert torch.equal(kept_plain, kept_staged)
    # without rescale a kept entry is the fine-tune's: θ0 + 1·τ
    assert torch.equal(plain[name][kept_plain], ft1[name][kept_plain])
    share = float(kept_plain.sum()) / float(changed.sum())
    assert 0.2 < share < 0.3, share


# ---- the pieces ----------------------------------------------------------------------------


def test_the_cpu_is_not_staged_unless_asked() -> None:
    t = DeviceTransfer.for_device(torch.device("cpu"))
    assert not t.staged and not t.pinned


def test_a_whole_tensor_goes_through_a_ring_of_two_in_parts_and_back() -> None:
    t = DeviceTransfer(torch.device("cpu"), Staging(2, 2, 48, None, 0))
    x = torch.arange(100, dtype=torch.float32).reshape(10, 10)
    flat = x.reshape(-1)
    fills: list[tuple[int, int]] = []

    def fill(start: int, out: torch.Tensor) -> None:
        fills.append((start, out.numel()))
        out.copy_(flat[start : start + out.numel()])

    sent = t.upload_from(100, torch.float32, (10, 10), fill)
    # 12 float32 per 48-byte buffer: 9 parts, the buffers refilled 7 times
    assert fills == [(s, min(12, 100 - s)) for s in range(0, 100, 12)]
    got = t.take(sent)
    assert got.shape == (10, 10) and torch.equal(got, x)
    # 24 float16 per buffer: 5 parts through two buffers, each given back once written
    out = []
    for p in t.download(got * 2, torch.float16):
        p.wait()
        out.append(p.tensor.clone())
        p.release()
    assert [o.numel() for o in out] == [24, 24, 24, 24, 4]
    assert torch.equal(torch.cat(out), (x * 2).to(torch.float16).reshape(-1))
    # the two input buffers, and one output buffer: each part was given back before the next
    assert t.host_bytes == 3 * 48


def test_the_output_ring_waits_for_the_writer_to_give_a_buffer_back() -> None:
    t = DeviceTransfer(torch.device("cpu"), Staging(1, 2, 16, None, 0))
    parts = t.download(torch.arange(12, dtype=torch.float32), torch.float32)  # 3 parts of 4
    first, second = next(parts), next(parts)

    third: list[PendingHost] = []
    taker = threading.Thread(target=lambda: third.append(next(parts)))
    taker.start()
    taker.join(0.2)
    assert taker.is_alive() and not third  # both buffers are with the writer
    first.wait()
    assert first.tensor.tolist() == [0, 1, 2, 3]
    first.release()
    taker.join(5)
    assert not taker.is_alive()
    assert third[0].tensor.data_ptr() == first.tensor.data_ptr()  # its buffer, reused
    second.wait()
    third[0].wait()
    assert second.tensor.tolist() == [4, 5, 6, 7] and third[0].tensor.tolist() == [8, 9, 10, 11]


def test_the_writer_writes_a_pending_part_once_it_has_landed_and_gives_it_back(tmp_path):
    spec = TensorSpec("w", torch.float32, (2, 3))
    buf = torch.zeros(6)
    events: list[str] = []

    def land() -> None:
        events.append("wait")
        buf.copy_(torch.arange(6, dtype=torch.float32))  # the copy lands only now

    with ShardedWriter(tmp_path, [spec]) as w:
        w.begin("w")
        w.append(PendingHost(buf, land, lambda: events.append("release")))
        w.end()
    (shard,) = tmp_path.glob("*.safetensors")
    assert load_file(str(shard))["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert events == ["wait", "release"]


def test_the_writer_gives_back_every_part_after_a_failure(tmp_path):
    specs = [TensorSpec(f"t{i}", torch.float32, (4,)) for i in range(3)]
    released: list[int] = []

    def broken() -> None:
        raise OSError("the copy failed")

    w = ShardedWriter(tmp_path, specs)
    w.write("t0", PendingHost(torch.zeros(4), broken, lambda: released.append(0)))
    with pytest.raises(OSError, match="the copy failed"):
        w.flush()
    with pytest.raises(OSError, match="the copy failed"):
        w.write("t1", PendingHost(torch.zeros(4), lambda: None, lambda: released.append(1)))
    w.abort()
    assert sorted(released) == [0, 1]
    assert not list(tmp_path.glob("*.safetensors"))


# ---- on a GPU --------------------------------------------------------------------------------


def _run(r: dict[str, Any], out: Path, device: str) -> dict[str, torch.Tensor]:
    run_merge(parse_recipe(r), out, seed=SEED, device=device)
    return load_output(out)


@pytest.mark.gpu
@pytest.mark.parametrize("case", FAMILIES)
def test_a_merge_on_cuda_equals_the_cpu_merge_within_float32_rounding(case, llama_family, tmp_path):
    r = LLAMA_CASES[case](llama_family)
    torch.cuda.reset_peak_memory_stats()
    gpu = _run(r, tmp_path / "cuda", "cuda")
    assert torch.cuda.max_memory_allocated() > 0  # it computed on the GPU
    cpu = _run(r, tmp_path / "cpu", "cpu")
    assert set(gpu) == set(cpu)
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=RTOL, atol=ATOL, msg=name)
    assert_matches_reference(gpu, reference_merge(r, SEED), out_dir=tmp_path / "cuda")


@pytest.mark.gpu
def test_a_streamed_merge_on_cuda_in_many_small_blocks_equals_the_cpu_merge(
    llama_family, monkeypatch, tmp_path
):
    """Blocks and ring buffers far smaller than the tensors: every buffer is reused many
    times while copies are in flight on the GPU's streams."""
    monkeypatch.setattr(
        transfer,
        "CUDA_STAGING",
        Staging(in_slots=2, out_slots=2, slot_bytes=4096, block_elements=4093, read_ahead_blocks=1),
    )
    for case in ("task_arithmetic", "ties", "dare_ties", "pcb", "slerp"):
        r = LLAMA_CASES[case](llama_family)
        gpu = _run(r, tmp_path / f"{case}-cuda", "cuda")
        cpu = _run(r, tmp_path / f"{case}-cpu", "cpu")
        for name in cpu:
            torch.testing.assert_close(gpu[name], cpu[name], rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["dare_linear_no_rescale", "della_linear"])
def test_random_methods_draw_the_same_masks_on_cuda_and_cpu(case, llama_family, tmp_path):
    r = LLAMA_CASES[case](llama_family)
    gpu = _run(r, tmp_path / "cuda", "cuda")
    cpu = _run(r, tmp_path / "cpu", "cpu")
    base = load_file(str(llama_family["base"] / "model.safetensors"))
    for name in cpu:
        # an entry every model dropped is the base's, exactly, on either device
        assert torch.equal(gpu[name] == base[name], cpu[name] == base[name]), name


@pytest.mark.gpu
def test_cuda_staging_pins_its_buffers_and_round_trips() -> None:
    t = DeviceTransfer.for_device(torch.device("cuda"))
    assert t.staged and t.pinned
    host = t.host_empty(1000, torch.float16)
    assert host.is_pinned()
    x = torch.randn(300, 70)
    sent = t.upload_from(
        x.numel(),
        x.dtype,
        tuple(x.shape),
        lambda s, out: out.copy_(x.reshape(-1)[s : s + out.numel()]),
    )
    got = t.take(sent)
    assert got.is_cuda and torch.equal(got.cpu(), x)
    back = []
    for p in t.download(got, torch.bfloat16):
        p.wait()
        assert p.tensor.is_pinned()
        back.append(p.tensor.clone())
        p.release()
    assert torch.equal(torch.cat(back), x.to(torch.bfloat16).reshape(-1))
    t.close()
