"""`conveyor secrets` against a real server: set (value from standard input or a file, never
from the command line), list (names and dates, never a value), delete; refusals with their
documented exit codes, and no value printed anywhere."""

from __future__ import annotations

from pathlib import Path

from tests.cli.conftest import Cli

VALUE = "s3cr3t-value-for-the-cli"


def test_set_from_stdin_list_and_delete(cli: Cli, name: str) -> None:
    project = f"sec-{name}"[:60]
    created = cli.ok("secrets", "set", "API_TOKEN", "-p", project, input=VALUE + "\n")
    assert VALUE not in created.out + created.err
    assert created.rows()[0]["NAME"] == "API_TOKEN" and created.rows()[0]["PROJECT"] == project
    listed = cli.ok("secrets", "list", "-p", project, "-o", "json")
    assert [(s["name"], s["project_id"]) for s in listed.json()] == [("API_TOKEN", project)]
    assert set(listed.json()[0]) == {"name", "project_id", "created_at", "updated_at"}
    assert VALUE not in listed.out

    deleted = cli.ok("secrets", "delete", "API_TOKEN", "-p", project)
    assert deleted.out.strip() == "secret API_TOKEN deleted"
    assert cli.ok("secrets", "list", "-p", project, "-o", "name").out == ""
    again = cli.run("secrets", "delete", "API_TOKEN", "-p", project)
    assert again.code == 5 and "SECRET_NOT_FOUND" in again.err


def test_set_from_a_file_keeps_inner_newlines(cli: Cli, name: str, tmp_path: Path) -> None:
    project = f"sec-{name}"[:60]
    pem = "-----BEGIN KEY-----\nabc\ndef\n-----END KEY-----\n"
    path = tmp_path / "key.pem"
    path.write_text(pem)
    cli.ok("secrets", "set", "PEM", "-p", project, "--value-file", str(path))
    assert cli.ok("secrets", "list", "-p", project, "-o", "name").out.split() == ["PEM"]


def test_refusals_say_why_without_the_value(cli: Cli, name: str, tmp_path: Path) -> None:
    project = f"sec-{name}"[:60]
    empty = cli.run("secrets", "set", "X", "-p", project, input="")
    assert empty.code == 2 and "empty" in empty.err
    missing = cli.run("secrets", "set", "X", "-p", project, "--value-file", str(tmp_path / "nope"))
    assert missing.code == 2 and "cannot read" in missing.err
    bad_name = cli.run("secrets", "set", "not-a-name", "-p", project, input=VALUE)
    assert bad_name.code == 1 and "INVALID_SECRET_NAME" in bad_name.err and VALUE not in bad_name.err
    # There is no way to pass the value as an argument.
    argv = cli.run("secrets", "set", "X", VALUE, "-p", project)
    assert argv.code == 2
    assert cli.ok("secrets", "list", "-p", project, "-o", "name").out == ""
