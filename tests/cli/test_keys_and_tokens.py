"""`conveyor keys` refuses a database that does not exist (exit 2, nothing created), and every
client command refuses a token a header cannot carry (exit 2, a clear message naming where the
token came from, no grpc noise, the token never quoted)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from conveyor.sdk import Worker, task
from tests.cli.conftest import Cli, Result
from tests.conftest import PG_URL_PREFIX

KEY_COMMANDS = (("list",), ("create", "--name", "k", "--project", "*", "--role", "admin"), ("revoke", "k"))


def refused_for_no_database(result: Result) -> None:
    assert result.code == 2, (result.code, result.out, result.err)
    assert "NO_DATABASE" in result.err and "Traceback" not in result.err, result.err
    assert result.out == ""


@pytest.mark.parametrize("command", KEY_COMMANDS, ids=lambda c: c[0])
def test_keys_refuse_an_absent_sqlite_database_and_create_nothing(cli: Cli, tmp_path: Path,
                                                                   command: tuple[str, ...]) -> None:
    data_dir = tmp_path / "typo"
    result = cli.raw("keys", *command, "--data-dir", str(data_dir))
    refused_for_no_database(result)
    assert str(data_dir / "conveyor.db") in result.err
    assert not data_dir.exists()
    # A file path in a directory that exists: the file is not created either.
    path = tmp_path / "absent.db"
    refused_for_no_database(cli.raw("keys", *command, "--db-url", f"sqlite:///{path}"))
    assert list(tmp_path.iterdir()) == []


def test_keys_refuse_an_absent_postgresql_database_without_its_password(cli: Cli) -> None:
    name = f"conveyor_absent_{uuid.uuid4().hex[:12]}"
    url = PG_URL_PREFIX.replace("postgres@", "postgres:s3cret-pw@") + name
    result = cli.raw("keys", "list", "--db-url", url)
    refused_for_no_database(result)
    assert name in result.err and "s3cret-pw" not in result.err and "***" in result.err


BAD_TOKENS = ["cvk_abc\ndef", "cvk_abc\r\n", "cvk_ab c", "cvk_\u00ffabc", "cvk_abc\x7f", "cvk_\x01abc"]


@pytest.mark.parametrize("token", BAD_TOKENS)
def test_a_token_a_header_cannot_carry_is_a_usage_error(cli: Cli, token: str) -> None:
    env = {**cli.env(), "CONVEYOR_TOKEN": token}
    for result in (cli.raw("--address", cli.address, "--token", token, "workflows", "list"),
                   cli.raw("--address", cli.address, "workflows", "list", env=env)):
        assert result.code == 2, (result.code, result.err)
        assert "--token (or CONVEYOR_TOKEN)" in result.err and "MALFORMED_TOKEN" in result.err
        assert "abc" not in result.err  # never quoted
        # Nothing from grpc: it was never handed the token.
        assert result.err.count("\n") == 1, result.err


def test_tokens_from_the_config_file_and_the_admin_token_file_are_checked(cli: Cli, tmp_path: Path) -> None:
    config = cli.home / "config" / "conveyor" / "config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({"address": cli.address, "token": "cvk_\u00e9x"}))
    try:
        result = cli.raw("workflows", "list")
        assert result.code == 2 and str(config) in result.err and "MALFORMED_TOKEN" in result.err, result.err
    finally:
        config.unlink()
    workdir = tmp_path / "work"
    (workdir / ".conveyor").mkdir(parents=True)
    (workdir / ".conveyor" / "admin.token").write_text("cvk_first\ncvk_second\n")
    result = cli.raw("--address", cli.address, "workflows", "list", cwd=workdir)
    assert result.code == 2 and "admin.token" in result.err and "cvk_first" not in result.err, result.err


def test_login_refuses_to_save_a_token_a_header_cannot_carry(cli: Cli) -> None:
    result = cli.raw("login", "--token", "cvk_a\tb")
    assert result.code == 2 and "MALFORMED_TOKEN" in result.err, result.err
    assert not (cli.home / "config" / "conveyor" / "config.json").exists()


@task(queue="anything")
async def _noop(ctx: object, input: object) -> None:
    return None


@pytest.mark.parametrize("token", BAD_TOKENS)
def test_the_sdk_refuses_such_an_api_key(token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="printable ASCII") as refused:
        Worker(tasks=[_noop], api_key=token)
    assert "abc" not in str(refused.value)
    monkeypatch.setenv("CONVEYOR_API_KEY", token)
    with pytest.raises(ValueError, match="CONVEYOR_API_KEY"):
        Worker(tasks=[_noop])
