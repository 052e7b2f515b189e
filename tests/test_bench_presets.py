"""bench/merge_bench.py's real-model shape presets and its new options (the script itself is
run by hand, not in CI; these check what it would generate without generating it)."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.scripts import loaded_script

BENCH = Path(__file__).resolve().parents[1] / "bench" / "merge_bench.py"


def torch_sees_a_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.fixture(scope="module")
def mb() -> Iterator[ModuleType]:
    with loaded_script(BENCH, "merge_bench_under_test") as module:
        yield module


def test_the_3b_preset_has_llama_3_2_3b_tensor_shapes_and_parameter_count(mb: ModuleType) -> None:
    shape = mb.PRESETS["3b"]
    specs = {name: dims for name, dims, _kind in mb.tensor_specs(shape)}
    # tied embeddings: no lm_head; embed + 28 layers x 9 tensors + final norm
    assert "lm_head.weight" not in specs
    assert len(specs) == 1 + 28 * 9 + 1
    assert specs["model.embed_tokens.weight"] == (128256, 3072)
    assert specs["model.layers.27.self_attn.q_proj.weight"] == (3072, 3072)
    assert specs["model.layers.0.self_attn.k_proj.weight"] == (1024, 3072)  # 8 KV heads x 128
    assert specs["model.layers.0.mlp.down_proj.weight"] == (3072, 8192)
    # hand-computed: embedding 128256*3072 = 394,002,432; per layer q,o 9,437,184 each,
    # k,v 3,145,728 each, gate/up/down 25,165,824 each, two norms 3,072 each
    per_layer = 2 * 9_437_184 + 2 * 3_145_728 + 3 * 25_165_824 + 2 * 3_072
    assert per_layer == 100_669_440
    total = sum(math.prod(dims) for dims in specs.values())
    assert total == 394_002_432 + 28 * 100_669_440 + 3_072 == 3_212_749_824
    config = mb.llama_config(shape)
    assert config["tie_word_embeddings"] is True
    assert config["head_dim"] == 128
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (24, 8)


def test_untied_shapes_keep_their_cache_key_and_their_lm_head(mb: ModuleType) -> None:
    shape = mb.choose_shape(0.05)
    assert "tied_embeddings" not in mb.shape_key(shape)
    assert mb.shape_key(mb.PRESETS["3b"])["tied_embeddings"] is True
    names = [name for name, _dims, _kind in mb.tensor_specs(shape)]
    assert names[-1] == "lm_head.weight"
    assert mb.llama_config(shape)["tie_word_embeddings"] is False


def test_preset_sets_the_size_and_finetunes_is_checked(mb: ModuleType) -> None:
    args = mb.parse_args(["--preset", "3b", "--finetunes", "2"])
    assert args.finetunes == 2
    assert args.size_gb == pytest.approx(3_212_749_824 * 2 / 1e9)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "3b", "--size-gb", "1"], "--preset replaces --size-gb"),
        (["--preset", "7b"], "invalid choice: '7b'"),
        (["--finetunes", "0"], "--finetunes must be between 1 and 16, got 0"),
        (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, not 'tpu'"),
        (["--device", "cuda", "--compat"], "--compat compares CPU outputs"),
    ],
)
def test_bad_options_are_refused_naming_the_option(
    mb: ModuleType, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        mb.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch_sees_a_gpu(), reason="this machine has a CUDA GPU")
def test_a_gpu_run_without_a_gpu_stops_before_building_anything(
    mb: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mb.main(["--device", "cuda", "--data-dir", str(tmp_path)]) == 2
    assert "torch sees no such CUDA GPU here; no GPU figure" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())  # no models, no results file


def test_proc_io_of_an_exited_unreaped_child_counts_its_writes(
    mb: ModuleType, tmp_path: Path
) -> None:
    out = tmp_path / "out.bin"
    code = f"open({str(out)!r}, 'wb').write(b'x' * 3_000_000)"
    res = mb.run_measured([sys.executable, "-c", code], tmp_path / "logs", "w", 60, flush=False)
    assert res.ok
    assert out.stat().st_size == 3_000_000
    assert res.io["wchar"] >= 3_000_000
