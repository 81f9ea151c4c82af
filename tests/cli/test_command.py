"""The `conveyor` command as a whole: help and exit codes, where the address and token come
from (flags, environment, `conveyor login`'s config file, ./.conveyor/admin.token), an
unreachable server, and tables on a terminal."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import Cli, Result

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_help_lists_commands_and_exit_codes(cli: Cli) -> None:
    result = cli.raw("--help")
    assert result.code == 0
    for command in ("serve", "worker", "login", "workflows", "runs", "steps", "watch"):
        assert re.search(rf"^\s+{command}\s", result.out, re.M), command
    assert "Exit codes" in result.out and "130" in result.out and "not found" in result.out
    for group, commands in {"runs": ["list", "get", "trigger", "cancel", "pause", "resume", "retry", "events",
                                     "bulk-cancel", "bulk-replay"],
                            "steps": ["approve", "input", "skip", "force-complete", "retry", "replay"],
                            "workflows": ["list", "get", "apply", "archive"]}.items():
        out = cli.raw(group, "--help").out
        assert all(re.search(rf"^\s+{c}\s", out, re.M) for c in commands), group


def test_usage_errors_exit_2(cli: Cli) -> None:
    assert cli.raw("no-such-command").code == 2
    assert cli.raw("runs", "get").code == 2
    assert cli.raw("--no-such-option").code == 2


def test_console_script_and_serve_help(cli: Cli) -> None:
    script = Path(sys.executable).parent / "conveyor"
    proc = subprocess.run([str(script), "serve", "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    for option in ("--grpc-port", "--http-port", "--db-url", "--data-dir", "--no-envoy"):
        assert option in proc.stdout
    worker = cli.raw("worker", "--help")
    assert worker.code == 0 and "MODULE:ATTR" in worker.out and "--target" in worker.out


def test_unreachable_server_is_one_clean_line(cli: Cli) -> None:
    result = cli.raw("--address", "127.0.0.1:1", "runs", "list")
    assert result.code == 1
    assert result.err == "error: cannot reach conveyor at 127.0.0.1:1: Connection refused (UNAVAILABLE)\n"


def _env(cli: Cli, config_home: Path, **extra: str) -> dict[str, str]:
    return {**cli.env(), "XDG_CONFIG_HOME": str(config_home), **extra}


def _list(cli: Cli, env: dict[str, str], *options: str, cwd: Path | None = None) -> Result:
    return cli.raw(*options, "workflows", "list", "-o", "name", env=env, cwd=cwd)


def test_login_writes_a_private_config_that_later_commands_use(cli: Cli, tmp_path: Path) -> None:
    env = _env(cli, tmp_path / "config")
    token = cli.token or "any-token"
    result = cli.raw("login", "--address", cli.address, "--token", token, env=env)
    assert result.code == 0, result.err
    path = tmp_path / "config" / "conveyor" / "config.json"
    assert json.loads(path.read_text()) == {"address": cli.address, "token": token}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    # No flag, no environment: address and token come from the file.
    assert _list(cli, env).code == 0
    # CONVEYOR_ADDRESS beats the file.
    unreachable = _list(cli, {**env, "CONVEYOR_ADDRESS": "127.0.0.1:1"})
    assert unreachable.code == 1 and "cannot reach conveyor at 127.0.0.1:1" in unreachable.err
    # --address beats both.
    assert _list(cli, {**env, "CONVEYOR_ADDRESS": "127.0.0.1:1"}, "--address", cli.address).code == 0


def test_token_precedence(cli: Cli, tmp_path: Path) -> None:
    if cli.token is None:
        pytest.skip("this server does not authenticate (no admin.token written)")
    good, bad = cli.token, "cvk_not-a-real-token"
    config_home = tmp_path / "config"
    address = ["--address", cli.address]

    # Nothing at all: the server refuses (4), with its reason.
    none = _list(cli, _env(cli, config_home), *address)
    assert none.code == 4 and none.err.startswith("error: ") and "(" in none.err
    # ./.conveyor/admin.token, written by a server started here, is the last resort.
    workdir = tmp_path / "checkout"
    (workdir / ".conveyor").mkdir(parents=True)
    (workdir / ".conveyor" / "admin.token").write_text(good + "\n")
    assert _list(cli, _env(cli, config_home), *address, cwd=workdir).code == 0
    # The config file beats it...
    assert cli.raw("login", "--token", bad, env=_env(cli, config_home)).code == 0
    assert _list(cli, _env(cli, config_home), *address, cwd=workdir).code == 4
    # ... CONVEYOR_TOKEN beats the config file...
    assert _list(cli, _env(cli, config_home, CONVEYOR_TOKEN=good), *address).code == 0
    # ... and --token beats CONVEYOR_TOKEN.
    assert _list(cli, _env(cli, config_home, CONVEYOR_TOKEN=good), *address, "--token", bad).code == 4
    assert _list(cli, _env(cli, config_home, CONVEYOR_TOKEN=bad), *address, "--token", good).code == 0


def test_a_damaged_config_file_is_a_usage_error(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "config" / "conveyor" / "config.json"
    path.parent.mkdir(parents=True)
    path.write_text("{oops")
    result = _list(cli, _env(cli, tmp_path / "config"))
    assert result.code == 2 and result.err.startswith("error: cannot read")


def test_tables_on_a_terminal(cli: Cli, name: str) -> None:
    """On a terminal (a pseudo-terminal here) the default output is an aligned table, not
    tab-separated rows."""
    path = cli.home / f"{name}.json"
    path.write_text(json.dumps({"name": name, "steps": [{"ref": "a", "kind": "noop"}]}))
    cli.ok("workflows", "apply", "-f", str(path))
    run_id = cli.ok("runs", "trigger", name, "--wait", "-o", "name").out.strip()

    def on_tty(*args: str) -> str:
        primary, secondary = os.openpty()
        env = {**cli.env(), "COLUMNS": "160", "TERM": "xterm"}
        options = ["--address", cli.address, *(["--token", cli.token] if cli.token else [])]
        try:
            proc = subprocess.run([sys.executable, "-m", "conveyor.cli", *options, *args], stdout=secondary,
                                  stderr=subprocess.PIPE, env=env, cwd=cli.home, timeout=30)
            os.close(secondary)
            assert proc.returncode == 0, proc.stderr
            chunks = []
            while True:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # EIO: the child's side is closed and everything was read
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(primary)
        return ANSI.sub("", b"".join(chunks).decode()).replace("\r\n", "\n")

    runs = on_tty("runs", "list", "-w", name)
    assert "\t" not in runs
    header, row = runs.splitlines()[:2]
    assert header.split() == ["ID", "WORKFLOW", "STATUS", "STARTED", "DURATION"]
    assert row.split()[:3] == [run_id, name, "completed"] and "ago" in row

    shown = on_tty("runs", "get", run_id)
    assert "Steps" in shown and re.search(r"^a\s+noop\s+completed", shown, re.M)
    workflows = on_tty("workflows", "list")
    assert re.search(rf"\s{re.escape(name)}\s+1\s+1\s", workflows)
