"""The ``weightsmith merge`` command, run as a real process (``python -m weightsmith``).

Happy path: the output directory holds shards, index, config, tokenizer, model card and a
manifest whose file list matches the disk (sizes and sha256 recomputed here with hashlib);
``--seed`` overrides the recipe's seed; the progress bar shows on a terminal only;
``parallelism`` (or ``--parallelism``) runs the parts in worker processes with the same
bytes as one process, and a bad value exits 2 naming it. Bad input:
exit 2 with one ``weightsmith: error:`` line and nothing left on disk (the full matrix of bad
inputs is in test_bad_input.py, through the same ``main``; here a few go through a process).
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.support.handmade import CONFIG, SHAPES, base_tensors, shifted, tree, write_model
from tests.support.split_outputs import family_recipe, same_output

pytestmark = pytest.mark.slow  # subprocesses

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = {"tokenizer.json": {"version": "1.0", "model": {"type": "WordLevel", "vocab": {}}},
             "tokenizer_config.json": {"model_max_length": 64}}  # fmt: skip


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """tmp_path/models/{base, ft1, ft2} (ft1 = base + 0.5, ft2 = base + 1.5, ft1 has a
    tokenizer) and tmp_path/recipe.yaml: linear, weights 3 and 1, 2 KB shards, seed 5."""
    write_model(tmp_path / "models" / "base", base_tensors())
    ft1 = write_model(tmp_path / "models" / "ft1", shifted(0.5))
    for name, content in TOKENIZER.items():
        (ft1 / name).write_text(json.dumps(content))
    write_model(tmp_path / "models" / "ft2", shifted(1.5))
    write_recipe(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [
                {"model": "./models/ft1", "parameters": {"weight": 3}},
                {"model": "./models/ft2", "parameters": {"weight": 1}},
            ],
            "seed": 5,
            "output": {"name": "tiny soup", "shard_size": "2KB"},
        },
    )
    return tmp_path


def write_recipe(folder: Path, recipe: dict[str, Any], name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def weightsmith(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m weightsmith ARGS`` with stdout and stderr captured (so not a TTY)."""
    return subprocess.run(
        [sys.executable, "-m", "weightsmith", *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FORCE_COLOR", None)
    env["PYTHONWARNINGS"] = "ignore"  # a library warning is not the CLI's output
    return env


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def front_matter(readme: str) -> dict[str, Any]:
    assert readme.startswith("---\n"), readme[:80]
    end = readme.index("\n---\n", 4)
    data = yaml.safe_load(readme[4:end])
    assert isinstance(data, dict)
    return data


def load_output(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        part = load_file(str(out / shard))
        assert all(index["weight_map"][n] == shard for n in part)
        tensors.update(part)
    assert set(tensors) == set(index["weight_map"])
    return tensors


# -- happy path ----------------------------------------------------------------------------------


def test_merge_writes_shards_index_config_card_and_manifest(workdir: Path) -> None:
    out = workdir / "merged"
    before = set(tree(workdir))
    run = weightsmith("merge", str(workdir / "recipe.yaml"), "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # not a terminal: no progress bar, nothing else either
    lines = run.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"merged linear into {out} (seed 5, ")

    # nothing else appeared next to the output (no staging directory left over)
    new_top = {p.split("/")[0] for p in set(tree(workdir)) - before}
    assert new_top == {"merged"}

    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 2  # 3104 bytes of weights in 2 KB shards
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    on_disk = {p.name for p in out.iterdir()}
    assert on_disk == {
        *shards,
        "model.safetensors.index.json",
        "config.json",
        "README.md",
        "manifest.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert all(p.is_file() for p in out.iterdir())

    # weights: (3·(b + 0.5) + 1·(b + 1.5)) / 4 = b + 0.75, float32 like the inputs
    merged = load_output(out)
    assert set(merged) == set(SHAPES)
    for name, b in base_tensors().items():
        assert merged[name].dtype == torch.float32
        torch.testing.assert_close(merged[name], b + 0.75, rtol=0, atol=0)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in merged.values())

    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == CONFIG["vocab_size"]
    assert config["num_hidden_layers"] == 2
    assert config["tie_word_embeddings"] is False  # lm_head.weight is in the output
    for name, content in TOKENIZER.items():
        assert json.loads((out / name).read_text()) == content

    readme = (out / "README.md").read_text()
    front = front_matter(readme)
    assert front["base_model_relation"] == "merge"
    assert "merge" in front["tags"]
    assert len(front["base_model"]) == 2
    assert "# tiny soup" in readme

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "linear"
    assert manifest["seed"] == 5
    assert manifest["name"] == "tiny soup"
    assert [p["role"] for p in manifest["parents"]] == ["model", "model"]
    listed = {f["path"]: f for f in manifest["files"]}
    assert set(listed) == on_disk - {"manifest.json"}
    for name, entry in listed.items():
        path = out / name
        assert entry["size"] == path.stat().st_size, name
        assert entry["sha256"] == sha256(path), name


def test_seed_option_overrides_the_recipe_seed_and_is_recorded(tmp_path: Path) -> None:
    write_model(tmp_path / "models" / "base", base_tensors())
    # task vectors of all ones·0.5 / 1.5: DARE's random drop makes the output depend on the seed
    write_model(tmp_path / "models" / "ft1", shifted(0.5))
    recipe: dict[str, Any] = {
        "merge_method": "dare_linear",
        "base_model": "./models/base",
        "models": [{"model": "./models/ft1", "parameters": {"density": 0.5}}],
        "parameters": {"rescale": False},
        "seed": 5,
    }
    with_5 = write_recipe(tmp_path, recipe, "seed5.yaml")
    with_7 = write_recipe(tmp_path, {**recipe, "seed": 7}, "seed7.yaml")

    runs = {
        "override": weightsmith("merge", str(with_5), "--out", str(tmp_path / "a"), "--seed", "7"),
        "recipe7": weightsmith("merge", str(with_7), "--out", str(tmp_path / "b")),
        "recipe5": weightsmith("merge", str(with_5), "--out", str(tmp_path / "c")),
    }
    for run in runs.values():
        assert run.returncode == 0, run.stderr
    assert "(seed 7," in runs["override"].stdout
    assert "(seed 5," in runs["recipe5"].stdout
    seeds = {d: json.loads((tmp_path / d / "manifest.json").read_text())["seed"] for d in "abc"}
    assert seeds == {"a": 7, "b": 7, "c": 5}

    a, b, c = (load_output(tmp_path / d) for d in "abc")
    base = base_tensors()
    for name in SHAPES:
        assert torch.equal(a[name], b[name]), name  # same seed, same drops
        # every entry is either dropped (base) or kept (base + 0.5): no rescale
        delta = a[name] - base[name]
        assert bool(((delta == 0) | (delta == 0.5)).all()), name
    assert any(not torch.equal(a[n], c[n]) for n in SHAPES)  # another seed, other drops


# -- progress bar --------------------------------------------------------------------------------


def _run_on_a_terminal(args: list[str], timeout: float = 120) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal (80×24); returns (code, stdout, terminal text)."""
    import fcntl
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "weightsmith", *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=_env(),
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed its end
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        assert proc.stdout is not None
        stdout = proc.stdout.read().decode()
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, stdout, b"".join(chunks).decode(errors="replace")


def test_progress_bar_is_shown_when_stderr_is_a_terminal(workdir: Path) -> None:
    out = workdir / "merged"
    code, stdout, terminal = _run_on_a_terminal(
        ["merge", str(workdir / "recipe.yaml"), "--out", str(out)]
    )
    assert code == 0, terminal
    assert "merged linear into" in stdout
    n = len(SHAPES)
    assert f"{n}/{n} tensors" in terminal, terminal
    assert "merge" in terminal
    assert "100%" in terminal


def test_quiet_hides_the_progress_bar_even_on_a_terminal(workdir: Path) -> None:
    code, stdout, terminal = _run_on_a_terminal(
        ["merge", str(workdir / "recipe.yaml"), "--out", str(workdir / "merged"), "--quiet"]
    )
    assert code == 0, terminal
    assert "merged linear into" in stdout
    assert "tensors" not in terminal
    assert terminal.strip() == ""


def test_no_progress_bar_when_stderr_is_not_a_terminal(workdir: Path) -> None:
    run = weightsmith("merge", str(workdir / "recipe.yaml"), "--out", str(workdir / "merged"))
    assert run.returncode == 0, run.stderr
    assert "tensors" not in run.stderr
    assert "\r" not in run.stderr
    assert run.stderr == ""


# -- bad input through a real process ------------------------------------------------------------


def _assert_refused(run: subprocess.CompletedProcess[str], *expect: str) -> str:
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("weightsmith: error: ")
    for part in expect:
        assert part in lines[0], lines[0]
    return lines[0]


def test_invalid_yaml_exits_2_with_one_error_line(workdir: Path) -> None:
    (workdir / "bad.yaml").write_text("merge_method: linear\nmodels: [./models/ft1\n")
    before = tree(workdir)
    run = weightsmith("merge", str(workdir / "bad.yaml"), "--out", str(workdir / "merged"))
    _assert_refused(run, "bad.yaml", "not valid YAML")
    assert tree(workdir) == before


def test_bad_checkpoint_exits_2_and_leaves_nothing(workdir: Path) -> None:
    ft2 = shifted(1.5)
    ft2["model.layers.0.mlp.down_proj.weight"][2, 3] = float("nan")
    write_model(workdir / "models" / "ft2", ft2)
    before = tree(workdir)
    run = weightsmith("merge", str(workdir / "recipe.yaml"), "--out", str(workdir / "merged"))
    _assert_refused(run, "./models/ft2", "model.layers.0.mlp.down_proj.weight", "NaN")
    assert tree(workdir) == before


def test_existing_output_directory_exits_2_and_is_left_untouched(workdir: Path) -> None:
    out = workdir / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = tree(workdir)
    run = weightsmith("merge", str(workdir / "recipe.yaml"), "--out", str(out))
    _assert_refused(run, "already exists and is not empty")
    assert tree(workdir) == before
    assert (out / "notes.txt").read_text() == "mine"


def test_empty_existing_output_directory_is_used(workdir: Path) -> None:
    out = workdir / "merged"
    out.mkdir()
    run = weightsmith("merge", str(workdir / "recipe.yaml"), "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert (out / "manifest.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_device_without_a_gpu_exits_2(workdir: Path) -> None:
    before = tree(workdir)
    run = weightsmith(
        "merge", str(workdir / "recipe.yaml"), "--out", str(workdir / "merged"), "--device", "cuda"
    )
    _assert_refused(run, "device", "no CUDA GPU is available")
    assert tree(workdir) == before


def test_console_script_is_installed_and_merges(workdir: Path) -> None:
    script = Path(sys.executable).with_name("weightsmith")
    if not script.is_file():
        pytest.skip("no weightsmith console script next to this interpreter")
    run = subprocess.run(
        [str(script), "merge", "recipe.yaml", "--out", "merged", "--quiet"],
        cwd=workdir,  # relative recipe and output paths
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert run.returncode == 0, run.stderr
    assert (workdir / "merged" / "manifest.json").is_file()


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from weightsmith.cli import main\n"
        "try:\n    main(['merge', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "--seed" in run.stdout
    assert run.stdout.strip().endswith("False")


# -- parallelism: the parts in local worker processes ----------------------------------------


@pytest.mark.parametrize(
    ("method", "parameters"),
    [("task_arithmetic", {}), ("ties", {"density": 0.3, "scope": "global"})],
    ids=["task_arithmetic", "ties_global"],
)
def test_parallelism_runs_the_parts_in_worker_processes_with_the_same_bytes(
    llama_family: dict[str, Path], tmp_path: Path, method: str, parameters: dict[str, Any]
) -> None:
    recipe = family_recipe(llama_family, method, **parameters)
    one = write_recipe(tmp_path, recipe, "one.yaml")
    three = write_recipe(tmp_path, {**recipe, "parallelism": 3}, "three.yaml")

    single = weightsmith("merge", str(one), "--out", str(tmp_path / "one"))
    split = weightsmith("merge", str(three), "--out", str(tmp_path / "three"))

    assert single.returncode == 0, single.stderr
    assert split.returncode == 0, split.stderr
    assert ", 3 processes)" in split.stdout and "processes" not in single.stdout
    shards = [p for p in (tmp_path / "three").iterdir() if p.name.startswith("model-")]
    assert len(shards) > 3
    same_output(tmp_path / "one", tmp_path / "three")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "one", "one.yaml", "three", "three.yaml"
    ]  # fmt: skip


def test_the_parallelism_option_overrides_the_recipe_and_gives_the_same_bytes(
    llama_family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = family_recipe(llama_family, "ties", density=0.3, scope="global")
    path = write_recipe(tmp_path, {**recipe, "parallelism": 3})
    run = weightsmith("merge", str(path), "--out", str(tmp_path / "two"), "--parallelism", "2")
    assert run.returncode == 0, run.stderr
    assert ", 2 processes)" in run.stdout

    from schemas.recipe import MergeRecipe
    from workers.merge.engine import run_merge

    single = run_merge(MergeRecipe.model_validate(recipe), tmp_path / "single")
    same_output(single.out_dir, tmp_path / "two")


@pytest.mark.parametrize(
    ("args", "recipe_value", "expect"),
    [
        (["--parallelism", "0"], None, "0 is not a positive number"),
        (["--parallelism", "two"], None, "'two' is not a whole number"),
        (["--parallelism", "65"], None, "--parallelism 65: at most 64"),
        ([], 0, "parallelism"),
        ([], 65, "parallelism"),
        ([], "three", "parallelism"),
    ],
)
def test_a_bad_parallelism_exits_2_naming_it_and_leaves_nothing(
    workdir: Path, args: list[str], recipe_value: Any, expect: str
) -> None:
    recipe = yaml.safe_load((workdir / "recipe.yaml").read_text())
    if recipe_value is not None:
        write_recipe(workdir, {**recipe, "parallelism": recipe_value})
    before = tree(workdir)
    run = weightsmith("merge", str(workdir / "recipe.yaml"), "--out", str(workdir / "x"), *args)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert expect in run.stderr, run.stderr
    assert tree(workdir) == before


def test_a_failing_part_stops_the_merge_and_leaves_nothing(
    llama_family: dict[str, Path], tmp_path: Path
) -> None:
    from tests.support.checkpoints import huge_finetune

    huge = huge_finetune(llama_family["ft2"], tmp_path / "huge")
    recipe = family_recipe(llama_family, "task_arithmetic")
    recipe["models"][1]["model"] = str(huge)
    recipe["output"]["dtype"] = "float16"  # the huge values overflow it: the part fails
    path = write_recipe(tmp_path, {**recipe, "parallelism": 3})
    before = tree(tmp_path)

    run = weightsmith("merge", str(path), "--out", str(tmp_path / "out" / "merged"))

    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("weightsmith: error:"), run.stderr
    assert "field 'output.dtype', tensor '" in lines[0]  # names the setting and the tensor
    assert tree(tmp_path) == before  # no output, no staging folder, no parent made


def test_run_merge_in_processes_reports_the_progress_summed_over_the_parts(
    llama_family: dict[str, Path], tmp_path: Path
) -> None:
    from schemas.recipe import MergeRecipe
    from workers.merge.parts import run_merge_in_processes

    seen: list[Any] = []
    recipe = MergeRecipe.model_validate(family_recipe(llama_family, "task_arithmetic"))
    run_merge_in_processes(recipe, tmp_path / "out", 2, progress=seen.append)

    merge = [p for p in seen if p.phase == "merge"]
    assert merge and merge[-1].tensors_done == merge[-1].tensors_total > 0
    assert merge[-1].bytes_done == merge[-1].bytes_total
    done = [p.tensors_done for p in merge]
    assert done == sorted(done)  # never goes back
