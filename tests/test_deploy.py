"""compose.yaml and docker/: checked statically, since Docker cannot run here.

The rule for configuration: weightsmith's own services (api, workers, beat) set only
``WEIGHTSMITH_*`` variables, each one that ``infra.settings`` reads, and their values,
interpolated with compose's defaults, must make valid settings. Commands must name real CLI
subcommands with valid options; Dockerfiles must exist, start from pinned images, copy
files that exist (and that .dockerignore does not drop); the API image must not get torch.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.secrets import SecretBox, new_key
from infra.settings import Settings, env_var_names
from weightsmith.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
WEIGHTSMITH_SERVICES = ("api", "worker", "light-worker", "beat")
_INTERPOLATION = re.compile(
    r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?(?P<op>[-?])(?P<word>[^}]*))?\}"
)
# What the tests put in for a variable compose requires (``${VAR:?message}``).
REQUIRED = {"WEIGHTSMITH_SECRET_KEYS": new_key()}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with nothing set in the shell: the default; a required
    ``${VAR:?message}``: the value of REQUIRED (a variable without one fails the test)."""

    def one(m: re.Match[str]) -> str:
        if m.group("op") == "?":
            assert m.group("name") in REQUIRED, f"compose requires {m.group('name')}"
            return REQUIRED[m.group("name")]
        return m.group("word") or ""

    return _INTERPOLATION.sub(one, value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["NAME=value", ...]
        env = dict(item.split("=", 1) for item in env)
    return {str(k): interpolate(str(v)) for k, v in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def dockerfile(service: dict[str, Any]) -> Path:
    build = service["build"]
    return ROOT / build.get("context", ".") / build["dockerfile"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments out."""
    joined: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: a continued line never ends"
    result = []
    for line in joined:
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


# ---- compose: services and their configuration ----------------------------------------------


def test_compose_has_the_production_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"api", "worker", "beat", "redis", "postgres", "s3"} <= set(services)
    assert services["redis"]["image"].startswith("redis:")
    assert services["postgres"]["image"].startswith("postgres:")
    assert "-s3" in command(services["s3"])


@pytest.mark.parametrize("name", WEIGHTSMITH_SERVICES)
def test_weightsmith_services_set_only_variables_that_settings_read(
    compose: dict[str, Any], name: str
) -> None:
    env = environment(compose["services"][name])
    assert env, f"{name} sets no environment"
    known = set(env_var_names())
    assert sorted(set(env) - known) == []
    assert all(v.startswith("WEIGHTSMITH_") for v in env)
    assert "env_file" not in compose["services"][name]  # would bring unchecked variables


@pytest.mark.parametrize("name", WEIGHTSMITH_SERVICES)
def test_weightsmith_services_environment_makes_valid_production_settings(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from infra.storage import s3_options

    for var in env_var_names():
        monkeypatch.delenv(var, raising=False)
    for var, value in environment(compose["services"][name]).items():
        monkeypatch.setenv(var, value)
    s = Settings()
    assert s.database_url.startswith("postgresql://") and "@postgres:5432/" in s.database_url
    assert s.broker_url == "redis://redis:6379/0"
    assert s.log_format == "json"
    options = s3_options(s.object_store_url)
    assert options["endpoint_url"] == "http://s3:8333"
    assert options["create_bucket"] is True  # the bucket is created by the first process
    assert s.hf_token is None and s.bootstrap_api_key is None  # unset unless given
    # every service seals and opens stored secrets with the same key
    assert s.secret_keys is not None
    assert (
        SecretBox.from_settings(s).open(SecretBox([REQUIRED["WEIGHTSMITH_SECRET_KEYS"]]).seal("x"))
        == "x"
    )


def test_api_and_workers_share_the_job_settings(compose: dict[str, Any]) -> None:
    """Timeouts, URLs and routing must agree, or a job would be routed, redelivered or
    declared lost by one process under rules the other does not know."""
    envs = {name: environment(compose["services"][name]) for name in WEIGHTSMITH_SERVICES}
    shared = set.intersection(*(set(e) for e in envs.values())) - {"WEIGHTSMITH_DATA_DIR"}
    for var in (
        "WEIGHTSMITH_DATABASE_URL",
        "WEIGHTSMITH_SECRET_KEYS",
        "WEIGHTSMITH_BROKER_URL",
        "WEIGHTSMITH_OBJECT_STORE_URL",
        "WEIGHTSMITH_JOB_HARD_TIME_LIMIT",
        "WEIGHTSMITH_WORKER_LOST_AFTER",
    ):
        assert var in shared
    for var in shared:
        assert len({e[var] for e in envs.values()}) == 1, var


def test_the_s3_server_accepts_the_credentials_the_services_use(compose: dict[str, Any]) -> None:
    import json

    from infra.storage import s3_options

    url = environment(compose["services"]["api"])["WEIGHTSMITH_OBJECT_STORE_URL"]
    options = s3_options(url)
    config = compose["configs"]["s3-identities"]["content"]
    identities = json.loads(interpolate(config))["identities"]
    creds = {(c["accessKey"], c["secretKey"]) for i in identities for c in i["credentials"]}
    assert (options["access_key"], options["secret_key"]) in creds
    mounted = compose["services"]["s3"]["configs"][0]
    assert f"-s3.config={mounted['target']}" in command(compose["services"]["s3"])


def test_the_database_url_matches_the_postgres_service(compose: dict[str, Any]) -> None:
    from sqlalchemy.engine import make_url

    pg = environment(compose["services"]["postgres"])
    url = make_url(environment(compose["services"]["api"])["WEIGHTSMITH_DATABASE_URL"])
    assert (url.username, url.password, url.database) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )
    assert (url.host, url.port) == ("postgres", 5432)


# ---- compose: commands ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["worker", "light-worker", "beat"])
def test_worker_and_beat_commands_are_valid_cli_invocations(
    compose: dict[str, Any], name: str
) -> None:
    argv = command(compose["services"][name])
    assert argv[0] == "weightsmith"
    parser = build_parser()
    subcommands = next(
        a.choices for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"
    )
    assert argv[1] in subcommands, f"`weightsmith {argv[1]}` does not exist (yet)"
    args = parser.parse_args(argv[1:])  # options valid too (SystemExit otherwise)
    assert args.command == argv[1]


def test_every_queue_work_is_routed_to_has_a_worker(compose: dict[str, Any]) -> None:
    from infra.queue import DEFAULT_QUEUE, GPU_QUEUE
    from infra.schedules import LIGHT_QUEUE

    queues: set[str] = set()
    for service in compose["services"].values():
        argv = command(service) if service.get("command") else []
        if argv[:2] == ["weightsmith", "worker"]:
            queues |= set(build_parser().parse_args(argv[1:]).queues.split(","))
    routed = environment(compose["services"]["api"]).get("WEIGHTSMITH_GPU_JOB_KINDS", "")
    assert DEFAULT_QUEUE in queues
    assert LIGHT_QUEUE in queues  # schedule fires (beat) go there
    if routed:
        assert GPU_QUEUE in queues


def test_the_api_command_runs_the_app_factory(compose: dict[str, Any]) -> None:
    import importlib

    argv = command(compose["services"]["api"])
    assert argv[0] == "uvicorn" and "--factory" in argv
    module, _, attr = next(a for a in argv if ":" in a and not a.startswith("-")).partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    port = int(argv[argv.index("--port") + 1])
    assert any(str(p).split(":")[-1] == str(port) for p in compose["services"]["api"]["ports"])
    healthcheck = " ".join(compose["services"]["api"]["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/healthz" in healthcheck


# ---- compose: health, order, GPU --------------------------------------------------------------


def _seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value):
        total += float(number) * units[unit]
    return total


def test_every_long_running_service_has_a_sane_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name == "beat":  # no port, nothing to ask; restart policy covers it
            continue
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        interval, timeout = _seconds(check["interval"]), _seconds(check["timeout"])
        assert 0 < timeout < interval <= 120, name
        assert 1 <= int(check["retries"]) <= 30, name


def test_depends_on_waits_for_healthy_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            assert condition in ("service_healthy", "service_started"), (name, dep)
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], (name, dep)
    for name in WEIGHTSMITH_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy"
    # The API migrates the database at start: workers and beat start after it is healthy.
    assert services["worker"]["depends_on"]["api"]["condition"] == "service_healthy"
    assert services["beat"]["depends_on"]["api"]["condition"] == "service_healthy"


def test_only_the_worker_reserves_a_gpu(compose: dict[str, Any]) -> None:
    def gpus(service: dict[str, Any]) -> list[Any]:
        reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        return [d for d in reservations.get("devices", []) if "gpu" in d["capabilities"]]

    assert len(gpus(compose["services"]["worker"])) == 1
    assert [n for n, s in compose["services"].items() if gpus(s) and n != "worker"] == []


def test_images_are_pinned_and_volumes_declared(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), name
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, (name, source)


# ---- Dockerfiles -------------------------------------------------------------------------------


def test_services_build_from_dockerfiles_that_exist(compose: dict[str, Any]) -> None:
    built = {n: dockerfile(s) for n, s in compose["services"].items() if "build" in s}
    assert set(built) == set(WEIGHTSMITH_SERVICES)
    for path in built.values():
        assert path.is_file(), path
    assert built["api"].name == "api.Dockerfile"
    assert (
        built["worker"].name
        == built["light-worker"].name
        == built["beat"].name
        == "worker.Dockerfile"
    )


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        if fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel, pat.replace("**/", "")):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("name", ["api.Dockerfile", "worker.Dockerfile"])
def test_dockerfile_is_well_formed(name: str) -> None:
    path = ROOT / "docker" / name
    steps = instructions(path)
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "EXPOSE", "HEALTHCHECK"}
    known |= {"CMD", "ENTRYPOINT", "LABEL"}
    assert {word for word, _ in steps} <= known
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) == 1
    image = froms[0].split()[0]
    assert ":" in image and not image.endswith(":latest")
    assert next(w for w, _ in steps if w != "ARG") == "FROM"
    assert steps[-1][0] == "CMD" or any(w == "CMD" for w, _ in steps)
    assert any(w == "USER" and a not in ("root", "0") for w, a in steps)  # not as root
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for word, args in steps:
        if word != "COPY":
            continue
        parts = [p for p in args.split() if not p.startswith("--")]
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: no such file"
            assert not _dockerignored(source.strip("./") or ".", ignore), (
                f"{name}: COPY {source} is excluded by .dockerignore"
            )


def _installs(path: Path) -> str:
    return " ".join(args for word, args in instructions(path) if word == "RUN")


def test_the_api_image_installs_neither_torch_nor_the_engine() -> None:
    path = ROOT / "docker" / "api.Dockerfile"
    runs = _installs(path)
    assert "pip install ." in runs
    assert "[engine" not in runs and "torch" not in runs
    copied = [a.split()[0] for w, a in instructions(path) if w == "COPY"]
    assert "workers" not in copied and "workers/" not in copied
    assert "python:3.11" in instructions(path)[0][1]
    cmd = next(a for w, a in instructions(path) if w == "CMD")
    assert "--factory" in cmd and "app.main:create_app" in cmd


def test_the_images_copy_every_package_they_install() -> None:
    # pip installs what pyproject's package list names from the copied tree: a package left
    # uncopied is missing at run time only. The API image leaves out workers/ (never imported).
    import tomllib

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {p.rstrip("*") for p in find["packages"]["find"]["include"]}
    for name, left_out in (("api.Dockerfile", {"workers"}), ("worker.Dockerfile", set())):
        steps = instructions(ROOT / "docker" / name)
        copied = {a.split()[0].strip("./") for w, a in steps if w == "COPY"}
        assert packages - left_out <= copied, f"{name} copies none of {packages - copied}"


def test_the_worker_image_has_cuda_torch_and_the_engine() -> None:
    path = ROOT / "docker" / "worker.Dockerfile"
    steps = instructions(path)
    image = next(a for w, a in steps if w == "FROM").split()[0]
    assert image.startswith("nvidia/cuda:") and "runtime" in image
    runs = _installs(path)
    assert "torch==" in runs and "download.pytorch.org/whl/cu" in " ".join(a for _, a in steps)
    assert '".[engine]"' in runs or "'.[engine]'" in runs
    cmd = next(a for w, a in steps if w == "CMD")
    assert '"weightsmith", "worker"' in cmd


def test_dockerfile_env_sets_only_settings_variables_or_standard_ones() -> None:
    standard = {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR"}
    standard |= {"PIP_DISABLE_PIP_VERSION_CHECK", "DEBIAN_FRONTEND", "PATH", "HF_HOME", "TMPDIR"}
    known = set(env_var_names())
    for name in ("api.Dockerfile", "worker.Dockerfile"):
        for word, args in instructions(ROOT / "docker" / name):
            if word != "ENV":
                continue
            for var in re.findall(r"(?:^|\s)([A-Z_][A-Z0-9_]*)=", args):
                assert var in known or var in standard, f"{name}: ENV {var}"
