"""What a failure means: which exceptions are retried (workers.errors.is_transient), what a
failed job's error says (failure_details), and the merge engine's overflow checks (a number
no float32 can hold, a result beyond the output dtype), refused like any bad input: the
exception naming field / model / tensor, the CLI's one error line, nothing left on disk."""

from __future__ import annotations

import errno
import json
import math
import secrets
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from infra.storage import InvalidKey, ObjectNotFound, StorageError, StorageUnavailable
from schemas.recipe import RecipeError, parse_recipe
from tests.support.handmade import (
    FT1_DELTA,
    HEAD,
    linear_recipe,
    refused,
    shifted,
    ta_recipe,
    write_model,
)
from workers.errors import (
    CheckpointError,
    InputError,
    SourceError,
    failure_details,
    is_transient,
    locate,
)
from workers.merge.engine import overflow_limit, run_merge
from workers.sources import SourceUnavailable

# ---- which failures are retried -----------------------------------------------------------


def _database_error() -> Exception:
    """A real OperationalError: SQLAlchemy connecting to a PostgreSQL port nobody serves."""
    import socket

    from sqlalchemy import create_engine, text

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = create_engine(f"postgresql+psycopg://u:p@127.0.0.1:{port}/db")
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as e:
        return e
    finally:
        engine.dispose()
    raise AssertionError("connected to a closed port")


def _missing_module() -> Exception:
    try:
        __import__(f"weightsmith_missing_{secrets.token_hex(4)}")
    except ImportError as e:
        return e
    raise AssertionError("imported a module that does not exist")


def _hub_unavailable() -> Exception:
    from workers.publish.hub_push import HubUnavailable

    return HubUnavailable("the Hub answered 503 on every attempt")


TRANSIENT: dict[str, Any] = {
    "connection refused": lambda: ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
    "timeout": lambda: TimeoutError("timed out"),
    "disk full": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "out of memory": lambda: MemoryError(),
    "object store unreachable": lambda: StorageUnavailable("cannot reach the object store"),
    "object store error": lambda: StorageError("InternalError"),
    "object vanished": lambda: ObjectNotFound("gone"),
    "source unavailable": lambda: SourceUnavailable("hub 503", model="org/m"),
    "hub push unavailable": _hub_unavailable,
    "database unreachable": _database_error,
}
PERMANENT: dict[str, Any] = {
    "bad input": lambda: InputError("shape differs", tensor="w"),
    "corrupt checkpoint": lambda: CheckpointError("truncated", file="model.safetensors"),
    "unknown source": lambda: SourceError("no such repo", model="org/m"),
    "missing module": _missing_module,
    "overflow": lambda: OverflowError("math range error"),
    "division by zero": lambda: ZeroDivisionError("division by zero"),
    "TypeError": lambda: TypeError("unsupported operand"),
    "KeyError": lambda: KeyError("model.norm.weight"),
    "AttributeError": lambda: AttributeError("'NoneType' has no attribute 'shape'"),
    "AssertionError": lambda: AssertionError(),
    "NotImplementedError": lambda: NotImplementedError(),
    "torch RuntimeError": lambda: RuntimeError("The size of tensor a (4) must match (5)"),
    "ValueError": lambda: ValueError("bad value"),
    "file not found": lambda: FileNotFoundError(errno.ENOENT, "No such file", "/srv/x"),
    "permission denied": lambda: PermissionError(errno.EACCES, "Permission denied"),
    "invalid object key": lambda: InvalidKey("'../x' escapes the store"),
}


@pytest.mark.parametrize("make", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_failures_of_the_machine_or_network_are_retried(make: Any) -> None:
    assert is_transient(make()) is True


@pytest.mark.parametrize("make", PERMANENT.values(), ids=PERMANENT.keys())
def test_bad_input_and_programming_errors_are_not_retried(make: Any) -> None:
    assert is_transient(make()) is False


def test_a_missing_module_is_named_with_what_to_do() -> None:
    e = _missing_module()
    details = failure_details(e)
    assert f"module {e.name!r}" in details["message"]  # type: ignore[attr-defined]
    assert "ModuleNotFoundError" in details["message"]
    assert "operator must install it" in details["message"]


def test_an_unexpected_error_names_its_class_and_location_but_not_its_text() -> None:
    token = "hf_" + secrets.token_hex(16)
    e = locate(KeyError(f"{token} /srv/weightsmith/work/job-1"), tensor="lm_head.weight")
    locate(e, tensor="outer", model="org/m")  # the innermost location wins; new fields join

    details = failure_details(e)

    assert (details["tensor"], details["model"]) == ("lm_head.weight", "org/m")
    assert "failed with KeyError" in str(details["message"])
    assert str(details["detail"]).startswith("model 'org/m', tensor 'lm_head.weight': ")
    text = json.dumps(details)
    assert token not in text and "/srv/" not in text


def test_a_transient_failure_says_whether_it_is_retried_or_was_on_each_attempt() -> None:
    e = TimeoutError("read timed out from 10.0.0.5")
    retrying = failure_details(e, retried=1, retrying=True)
    assert str(retrying["message"]).startswith("attempt 1 failed with TimeoutError")
    assert "the job is retried" in str(retrying["message"])
    final = failure_details(e, retried=3)
    assert "TimeoutError on each of 3 attempts" in str(final["message"])
    assert "10.0.0.5" not in json.dumps([retrying, final])


def test_an_input_error_keeps_its_own_message_and_location() -> None:
    e = InputError("shape (2, 3) differs", model="./ft1", tensor="w")
    assert failure_details(e) == e.to_dict()


# ---- overflow in the merge engine ---------------------------------------------------------


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "linear"])
def test_a_weight_no_float32_can_hold_is_refused_with_the_recipe_naming_the_weight(
    zoo: Path,
    capsys: pytest.CaptureFixture[str],
    method: str,
) -> None:
    recipe = ta_recipe(merge_method=method)
    if method == "linear":
        recipe = linear_recipe("./models/ft1", "./models/ft2")
    recipe["models"][0]["parameters"] = {"weight": 1e300}
    if method == "ties":
        recipe["parameters"] = {"density": 0.5}
    refused(
        zoo,
        recipe,
        error=RecipeError,
        expect=("models[0].parameters.weight", "largest float32", "1e+300"),
        capsys=capsys,
    )


def test_a_recipe_wide_parameter_no_float32_can_hold_names_the_parameter(
    zoo: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    refused(
        zoo,
        ta_recipe(parameters={"lambda": -1e300}),
        error=RecipeError,
        expect=("parameters.lambda", "largest float32", "-1e+300"),
        capsys=capsys,
    )


def test_parameters_that_overflow_only_together_are_refused_with_the_recipe(
    zoo: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # 1e20 and 1e20 are float32 numbers; their product, the scale of a task vector, is not.
    recipe = ta_recipe(parameters={"lambda": 1e20, "normalize": False})
    recipe["models"][0]["parameters"] = {"weight": 1e20}
    refused(
        zoo,
        recipe,
        error=RecipeError,
        expect=("|λ|·|weight|", "1e+40"),
        capsys=capsys,
    )


def test_values_that_overflow_only_with_the_data_fail_naming_the_tensor(
    zoo: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Ordinary weights, but ft1's values reach 1e38: 5 × (ft1 − base) is past float32.
    huge = {k: t * (1e38 / float(t.abs().max())) for k, t in shifted(FT1_DELTA).items()}
    write_model(zoo / "models" / "huge", huge)
    recipe = ta_recipe(parameters={"normalize": False})
    recipe["models"][0] = {"model": "./models/huge", "parameters": {"weight": 5.0}}
    refused(
        zoo,
        recipe,
        field="parameters",
        tensor=HEAD,
        expect=("overflowed float32",),
        capsys=capsys,
    )


def test_a_result_beyond_float16_is_refused_naming_the_output_dtype(
    zoo: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # lm_head of ft2 reaches 255/64 + 1.5 ≈ 5.48: × 12000 is ≈ 65700, past float16's 65504.
    recipe = linear_recipe("./models/ft2")
    recipe["models"][0]["parameters"] = {"weight": 12000.0}
    recipe["parameters"] = {"normalize": False}
    recipe["output"] = {"dtype": "float16"}
    peak = 12000.0 * (255 / 64 + 1.5)
    refused(
        zoo,
        recipe,
        field="output.dtype",
        tensor=HEAD,
        expect=(f"reach {peak:.5g}", "output dtype float16 (±65504)"),
        capsys=capsys,
    )


def test_the_same_result_is_published_as_bfloat16_and_float32(zoo: Path) -> None:
    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        recipe = linear_recipe(str(zoo / "models" / "ft2"))
        recipe["models"][0]["parameters"] = {"weight": 12000.0}
        recipe["parameters"] = {"normalize": False}
        recipe["output"] = {"dtype": dtype}
        out = run_merge(parse_recipe(recipe), zoo / f"out-{dtype}").out_dir
        merged = load_file(str(out / "model-00001-of-00001.safetensors"))[HEAD]
        source = load_file(str(zoo / "models" / "ft2" / "model.safetensors"))[HEAD]
        assert merged.dtype == torch_dtype
        torch.testing.assert_close(merged, (source * 12000.0).to(torch_dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_overflow_limit_is_where_the_cast_starts_giving_infinity(dtype: torch.dtype) -> None:
    limit = overflow_limit(dtype)
    at = torch.tensor([limit], dtype=torch.float32)
    below = torch.nextafter(at, torch.zeros(1))  # the float32 just under it
    assert float(at) == limit  # the limit is a float32 number: the check is exact
    assert torch.isfinite(below.to(dtype)).all()
    assert torch.isinf(at.to(dtype)).all()
    assert torch.isinf((-at).to(dtype)).all()
    assert overflow_limit(torch.float32) == math.inf
