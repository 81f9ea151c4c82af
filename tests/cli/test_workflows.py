"""`conveyor workflows list|get|apply|archive` against a real server."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.conftest import Cli

YAML = """\
name: {name}
description: built from YAML
steps:
  - ref: build
    kind: noop
    config: {{output: {{sha: abc123, size: 5}}}}
  - ref: test
    kind: noop
    depends_on: [build]
"""


def test_apply_creates_from_yaml_then_updates_by_name(cli: Cli, name: str) -> None:
    path = cli.home / f"{name}.yaml"
    path.write_text(YAML.format(name=name))

    created = cli.run("workflows", "apply", "-f", str(path), "-o", "json")
    assert created.code == 0, created.err
    assert f"workflow {name} created (version 1)" in created.err
    first = created.json()
    assert first["name"] == name and first["version"] == 1
    assert [s["ref"] for s in first["steps"]] == ["build", "test"]
    # Whole numbers stay whole in JSON output.
    assert first["steps"][0]["config"]["output"] == {"sha": "abc123", "size": 5}

    path.write_text(YAML.format(name=name).replace("built from YAML", "second version"))
    updated = cli.run("workflows", "apply", "-f", str(path), "-o", "json")
    assert updated.code == 0, updated.err
    assert f"workflow {name} updated (version 2)" in updated.err
    assert updated.json()["id"] == first["id"]
    shown = cli.ok("workflows", "get", name, "-o", "json").json()
    assert shown["version"] == 2 and shown["description"] == "second version"


def test_apply_json_and_list_formats(cli: Cli, name: str) -> None:
    wf = cli.apply({"name": name, "steps": [{"ref": "a", "kind": "noop"}]})

    piped = cli.ok("workflows", "list")
    assert piped.out.splitlines()[0].split("\t") == ["ID", "NAME", "VERSION", "STEPS", "SCHEDULE", "UPDATED"]
    rows = {r["NAME"]: r for r in piped.rows()}
    assert rows[name]["ID"] == wf["id"] and rows[name]["VERSION"] == "1" and rows[name]["STEPS"] == "1"
    assert rows[name]["UPDATED"].endswith("Z")  # piped output shows exact times

    assert wf["id"] in cli.ok("workflows", "list", "-o", "name").out.split()
    wide = cli.ok("workflows", "list", "-o", "wide").rows()
    assert {r["NAME"]: r["PROJECT"] for r in wide}[name] == "default"
    as_json = cli.ok("workflows", "list", "--json").json()
    assert name in [w["name"] for w in as_json]
    lines = cli.ok("workflows", "list", "-o", "jsonl").out.splitlines()
    assert name in [json.loads(line)["name"] for line in lines]


def test_get_by_id_and_by_name(cli: Cli, name: str) -> None:
    wf = cli.apply({"name": name, "steps": [{"ref": "a", "kind": "noop"}]})
    by_id = cli.ok("workflows", "get", wf["id"]).rows()
    assert [r["NAME"] for r in by_id] == [name]
    assert cli.ok("workflows", "get", name, "-o", "name").out.strip() == wf["id"]


def test_archive_hides_from_list_and_refuses_triggers(cli: Cli, name: str) -> None:
    wf = cli.apply({"name": name, "steps": [{"ref": "a", "kind": "noop"}]})

    archived = cli.run("workflows", "archive", name)
    assert archived.code == 0, archived.err
    assert cli.ok("workflows", "get", wf["id"], "-o", "json").json()["archived"] is True
    assert wf["id"] not in cli.ok("workflows", "list", "-o", "name").out.split()
    assert wf["id"] in cli.ok("workflows", "list", "--archived", "-o", "name").out.split()
    refused = cli.run("runs", "trigger", wf["id"])
    assert refused.code != 0
    assert refused.err.startswith("error: ") and "Traceback" not in refused.err


def test_get_missing_is_not_found(cli: Cli) -> None:
    result = cli.run("workflows", "get", "no-such-workflow")
    assert result.code == 5
    assert result.err.strip().splitlines() == [result.err.strip()]  # one line
    assert result.err.startswith("error: ") and result.err.rstrip().endswith("(WORKFLOW_NOT_FOUND)")
    assert cli.run("workflows", "archive", "no-such-workflow").code == 5


def test_apply_invalid_definition_is_refused_with_its_reason(cli: Cli, name: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": name, "steps": [{"ref": "a", "kind": "teleport"}]}))
    result = cli.run("workflows", "apply", "-f", str(path))
    assert result.code == 1
    assert result.err.startswith("error: ") and "(INVALID_" in result.err
    assert "Traceback" not in result.err
    assert name not in cli.ok("workflows", "list").out


def test_apply_usage_errors(cli: Cli, tmp_path: Path) -> None:
    text = tmp_path / "wf.txt"
    text.write_text("{}")
    assert cli.run("workflows", "apply", "-f", str(text)).code == 2
    broken = tmp_path / "wf.json"
    broken.write_text("{not json")
    assert cli.run("workflows", "apply", "-f", str(broken)).code == 2
    assert cli.run("workflows", "apply", "-f", str(tmp_path / "missing.yaml")).code == 2
    assert cli.run("workflows", "apply").code == 2  # -f is required
