"""Secrets at rest (infra.secrets) and the operator's commands that manage tenants and keys."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import select, update

from infra.db import ApiKeys, make_engine, upgrade_database
from infra.db.models import S3Grant, Tenant
from infra.db.tenants import TenantStore
from infra.db.webhooks import WebhookSecretRow, WebhookStore, WebhookSubscriptionRow
from infra.secrets import (
    SEALED_PREFIX,
    SecretBox,
    SecretKeyError,
    new_key,
    read_or_create_key_file,
)
from infra.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_a_sealed_secret_opens_with_its_key_only_and_its_text_never_shows() -> None:
    box = SecretBox([new_key()])
    sealed = box.seal("hf_plainToken")
    assert sealed.startswith(SEALED_PREFIX) and "hf_plainToken" not in sealed
    assert box.open(sealed) == "hf_plainToken"
    assert box.seal("hf_plainToken") != sealed  # a fresh IV each time
    with pytest.raises(SecretKeyError, match="WEIGHTSMITH_SECRET_KEYS") as e:
        SecretBox([new_key()]).open(sealed)
    assert "hf_plainToken" not in str(e.value)
    assert repr(box) == "SecretBox(***)"


def test_a_value_stored_before_encryption_is_read_as_is_and_sealed_by_reseal() -> None:
    box = SecretBox([new_key()])
    assert box.open("whsec_legacy") == "whsec_legacy"
    resealed = box.reseal("whsec_legacy")
    assert box.is_sealed(resealed) and box.open(resealed) == "whsec_legacy"


def test_rotation_new_key_first_then_reseal_then_the_old_key_can_go() -> None:
    old, new = new_key(), new_key()
    sealed_old = SecretBox([old]).seal("s3-secret")
    both = SecretBox([new, old])
    assert both.open(sealed_old) == "s3-secret"  # old values still open during rotation
    resealed = both.reseal(sealed_old)
    assert SecretBox([new]).open(resealed) == "s3-secret"
    with pytest.raises(SecretKeyError):
        SecretBox([old]).open(resealed)


@pytest.mark.parametrize("bad", ["", "not-a-key", "YWJj", "a" * 44])
def test_a_key_that_is_not_a_fernet_key_is_refused_naming_the_setting(bad: str) -> None:
    with pytest.raises(SecretKeyError, match="WEIGHTSMITH_SECRET_KEYS"):
        SecretBox([bad])


def test_the_embedded_key_file_is_made_once_owner_only_even_by_racing_processes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "data" / "secret-key"
    keys: list[str] = []
    threads = [
        threading.Thread(target=lambda: keys.append(read_or_create_key_file(path)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SecretBox(keys).open(SecretBox(keys).seal("x")) == "x"
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret-key"]  # no temp left


def test_settings_choose_the_keys_first_from_the_variable_then_from_the_data_dir(
    tmp_path: Path,
) -> None:
    key = new_key()
    from_env = SecretBox.from_settings(Settings(data_dir=tmp_path, secret_keys=key))
    assert SecretBox([key]).open(from_env.seal("x")) == "x"
    assert not (tmp_path / "secret-key").exists()
    embedded = SecretBox.from_settings(Settings(data_dir=tmp_path))
    file_key = (tmp_path / "secret-key").read_text().strip()
    assert SecretBox([file_key]).open(embedded.seal("y")) == "y"


def test_the_service_seals_webhook_secrets_stored_in_plain_text_by_an_earlier_version(
    tmp_path: Path,
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = Settings(
        data_dir=tmp_path / "data", bootstrap_key_file=None, object_store_url=f"file://{tmp_path}/a"
    )
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    tenant = ApiKeys(engine).ensure_tenant("acme").id
    hooks = WebhookStore(engine, SecretBox.from_settings(settings))
    sub = hooks.create_subscription(tenant, "https://example.com/hook", ["job.queued"])
    hooks.signing_secret(tenant)
    with engine.begin() as conn:  # as an earlier version stored them
        conn.execute(update(WebhookSubscriptionRow).values(secret="whsec_plainSubscription"))
        conn.execute(update(WebhookSecretRow).values(secret="whsec_plainCallback"))
    with TestClient(create_app(settings)):
        pass
    with engine.connect() as conn:
        stored = [
            *conn.scalars(select(WebhookSubscriptionRow.secret)),
            *conn.scalars(select(WebhookSecretRow.secret)),
        ]
    assert all(v.startswith(SEALED_PREFIX) for v in stored)
    box = SecretBox.from_settings(settings)
    assert hooks.signing_secret(tenant).secret == "whsec_plainCallback"
    assert box.open(stored[0]) == "whsec_plainSubscription"
    assert hooks.get_subscription(tenant, sub.id) is not None
    engine.dispose()


# ---- the operator's commands ------------------------------------------------------------------


def cli(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weightsmith", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def operator_env(tmp_path: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSMITH_")},
        "WEIGHTSMITH_DATA_DIR": str(tmp_path / "data"),
        "WEIGHTSMITH_OBJECT_STORE_URL": "s3://artifacts/p?endpoint=http://127.0.0.1:9",
        "PYTHONPATH": str(ROOT),
    }


@pytest.mark.slow  # CLI subprocesses
def test_tenants_commands_grant_show_disable_and_refuse_bad_grants(
    operator_env: dict[str, str], tmp_path: Path
) -> None:
    assert cli(operator_env, "keys", "create", "--tenant", "acme").returncode == 0
    env = {**operator_env, "WEIGHTSMITH_GRANT_SECRET_ACCESS_KEY": "s3-secret-of-the-grant"}
    granted = cli(
        env,
        "tenants",
        "grant-s3",
        "--tenant",
        "acme",
        "s3://datasets/acme",
        "--access-key-id",
        "AK",
    )
    assert granted.returncode == 0, granted.stderr
    assert "s3://datasets/acme/ at http://127.0.0.1:9" in granted.stdout
    assert cli(env, "tenants", "grant-hub-push", "--tenant", "acme", "acme-org").returncode == 0
    shown = cli(env, "tenants", "show", "acme")
    assert "s3://datasets/acme/" in shown.stdout and "acme-org" in shown.stdout
    assert "s3-secret-of-the-grant" not in shown.stdout + shown.stderr

    # the artifact store's bucket (same server) cannot be granted; nor a malformed location
    for location, words in (
        ("s3://artifacts/acme/", "artifact store's bucket"),
        ("s3://datasets/a/../b/", "segments"),
        ("https://datasets/x", "s3://"),
    ):
        refused = cli(env, "tenants", "grant-s3", "--tenant", "acme", location, "--anonymous")
        assert refused.returncode == 2 and words in refused.stderr, refused.stderr
    missing_mode = cli(env, "tenants", "grant-s3", "--tenant", "acme", "s3://datasets/x/")
    assert missing_mode.returncode == 2 and "--anonymous" in missing_mode.stderr
    unknown = cli(env, "tenants", "disable", "nobody")
    assert unknown.returncode == 2 and "no tenant named 'nobody'" in unknown.stderr

    engine = make_engine(f"sqlite:///{tmp_path}/data/weightsmith.db")
    try:
        with engine.connect() as conn:
            (secret,) = conn.scalars(select(S3Grant.secret_access_key)).all()
        assert secret is not None and secret.startswith(SEALED_PREFIX)
        assert cli(env, "tenants", "disable", "acme").returncode == 0
        with engine.connect() as conn:
            assert conn.scalar(select(Tenant.disabled_at)) is not None
        assert "disabled" in cli(env, "tenants", "list").stdout
        assert cli(env, "tenants", "enable", "acme").returncode == 0
        revoked = cli(env, "tenants", "revoke-s3", "--tenant", "acme", "s3://datasets/acme/")
        assert revoked.returncode == 0
        with engine.connect() as conn:
            assert conn.scalars(select(S3Grant)).all() == []
    finally:
        engine.dispose()


@pytest.mark.slow  # CLI subprocesses
def test_secrets_rotate_reseals_everything_under_a_new_first_key(
    operator_env: dict[str, str], tmp_path: Path
) -> None:
    old = new_key()
    env = {**operator_env, "WEIGHTSMITH_SECRET_KEYS": old}
    assert cli(env, "keys", "create", "--tenant", "acme").returncode == 0
    settings = Settings(data_dir=tmp_path / "data", secret_keys=old)
    engine = make_engine(settings.database_url)
    try:
        store = TenantStore(engine, SecretBox([old]))
        tenant = ApiKeys(engine).ensure_tenant("acme").id
        store.set_hub_token(tenant, "hf_rotateMe")
        WebhookStore(engine, SecretBox([old])).signing_secret(tenant)
        new = cli(env, "secrets", "new-key").stdout.strip()
        rotated = cli({**env, "WEIGHTSMITH_SECRET_KEYS": f"{new},{old}"}, "secrets", "rotate")
        assert rotated.returncode == 0 and "re-sealed 2 secret(s)" in rotated.stdout
        only_new = SecretBox([new])
        assert TenantStore(engine, only_new).access(tenant, operator_hub_token=None).hub_token == (
            "hf_rotateMe"
        )
        assert WebhookStore(engine, only_new).signing_secret(tenant).secret.startswith("whsec_")
    finally:
        engine.dispose()


@pytest.mark.slow  # a serve process and CLI subprocesses
def test_hub_token_set_reads_the_token_from_stdin_and_tenant_shows_it_is_used(
    tmp_path: Path,
) -> None:
    from tests.support.serve import running_serve

    with running_serve(tmp_path) as (base, _log):
        key = (tmp_path / "data" / "bootstrap-api-key").read_text().strip()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSMITH_")},
            "WEIGHTSMITH_URL": base,
            "WEIGHTSMITH_TOKEN": key,
            "PYTHONPATH": str(ROOT),
        }
        stored = cli(env, "hub-token", "set", stdin="hf_fromStdin123\n")
        assert stored.returncode == 0, stored.stderr
        shown = cli(env, "tenant")
        assert "hub token:  yours" in shown.stdout and "hf_fromStdin123" not in shown.stdout
        assert cli(env, "hub-token", "clear").returncode == 0
        assert "hub token:  none" in cli(env, "tenant").stdout
        empty = cli(env, "hub-token", "set", stdin="\n")
        assert empty.returncode == 2 and "no token" in empty.stderr
