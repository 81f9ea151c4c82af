"""`conveyor watch` against a real server: the live view in a pseudo-terminal (steps in DAG
order, updating in place until the run ends), its exit codes, plain lines and NDJSON when stdout
is not a terminal, resuming after the server is killed and restarted on the same port, and the
live table of a project's runs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli.conftest import Cli, _wait_for_address
from tests.cli.test_runs import gated, parent

# Every escape sequence rich writes: colors, cursor moves, line erasing, cursor hiding.
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# What rich's Live writes before redrawing over the previous frame (an erased line).
ERASE_LINE = "\x1b[2K"
WAIT = 30.0


class Terminal:
    """A command whose stdout (and stdin) is a pseudo-terminal, as a person would run it; stderr
    is read apart. Everything written to the terminal is kept."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.primary, secondary = os.openpty()
        env = {**env, "COLUMNS": "120", "LINES": "40", "TERM": "xterm-256color"}
        self.proc = subprocess.Popen([sys.executable, "-m", "conveyor.cli", *args], stdin=secondary,
                                     stdout=secondary, stderr=subprocess.PIPE, env=env, cwd=cwd)
        os.close(secondary)
        self._raw = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.err = ""
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.primary, 65536)
            except OSError:  # EIO: the child's side is closed and everything was read
                return
            if not chunk:
                return
            with self._lock:
                self._raw += chunk

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err += line.decode()

    @property
    def raw(self) -> str:
        with self._lock:
            return self._raw.decode(errors="replace")

    @property
    def text(self) -> str:
        """Everything shown so far, every frame, escapes removed."""
        return ESCAPES.sub("", self.raw).replace("\r", "")

    @property
    def last_frame(self) -> str:
        """The frame drawn last (rich erases the lines of the previous frame before each)."""
        return ESCAPES.sub("", self.raw.rsplit(ERASE_LINE, 1)[-1]).replace("\r", "")

    def wait_for(self, pattern: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text, re.M):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.2)  # what is still in the pipe
                raise AssertionError(f"{pattern!r} never shown (exit {self.proc.poll()}); screen:\n"
                                     f"{self.text[-3000:]}\nstderr:\n{self.err}")
            time.sleep(0.05)

    def exit_code(self, timeout: float = WAIT) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        self._err_reader.join(5)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.primary)


def _options(cli: Cli) -> list[str]:
    return ["--address", cli.address, *(["--token", cli.token] if cli.token else [])]


@pytest.fixture
def terminal(cli: Cli) -> Iterator[Any]:
    """`terminal(*args)`: `conveyor ARGS...` on a pseudo-terminal, pointed at the module's server."""
    opened: list[Terminal] = []

    def start(*args: str, target: Cli | None = None) -> Terminal:
        t = Terminal([*_options(target or cli), *args], (target or cli).env(), cli.home)
        opened.append(t)
        return t

    yield start
    for t in opened:
        t.close()


def shuffled_gate(name: str) -> dict[str, Any]:
    """build -> {test, lint} -> gate (approval) -> ship, listed out of DAG order."""
    return {"name": name, "steps": [
        {"ref": "ship", "kind": "noop", "depends_on": ["gate"]},
        {"ref": "gate", "kind": "approval", "depends_on": ["test", "lint"]},
        {"ref": "test", "kind": "noop", "depends_on": ["build"]},
        {"ref": "build", "kind": "noop"},
        {"ref": "lint", "kind": "noop", "depends_on": ["build"]},
    ]}


def _step_rows(frame: str) -> list[list[str]]:
    lines = frame.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["STEP", "KIND", "STATUS"])
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def test_live_view_of_a_gated_run_updates_until_it_completes(cli: Cli, name: str, terminal: Any) -> None:
    cli.apply(shuffled_gate(name))
    run = cli.trigger(name)
    screen = terminal("watch", run["id"])
    # The approval step waits; the view says so (and the steps that ran before it completed).
    screen.wait_for(r"^gate\s+approval\s+waiting\s+1\s")
    screen.wait_for(r"^ship\s+noop\s+pending\s+0\s")
    assert screen.proc.poll() is None  # still following

    cli.ok("steps", "approve", run["id"], "gate", "-m", "ship it")
    assert screen.exit_code() == 0, screen.err
    frame = screen.last_frame
    assert re.search(rf"run {run['id']}\s+{name} v1\s+completed", frame), frame
    rows = _step_rows(frame)
    # DAG order: build before test and lint (listed order among equals), gate, then ship.
    assert [r[0] for r in rows] == ["build", "test", "lint", "gate", "ship"], frame
    assert all(r[2] == "completed" and r[3] == "1" for r in rows), frame
    assert rows[3][5] == "test,lint" and rows[4][5] == "gate", frame  # NEEDS
    assert re.search(r"^gate\s.*approved by \S+", frame, re.M), frame
    assert "Traceback" not in screen.err


def test_a_failing_run_exits_1_and_prints_plain_lines_off_a_terminal(cli: Cli, name: str) -> None:
    # An approval first, given once the watch has drawn its snapshot, so the failure is watched
    # live however slowly the command starts.
    failing = parent(name)
    failing["steps"] = [{"ref": "gate", "kind": "approval"},
                        {**failing["steps"][0], "depends_on": ["gate"]}]
    cli.apply(failing)
    run = cli.trigger(name, "--payload", json.dumps({"target": f"{name}-missing"}))
    token = ["--token", cli.token] if cli.token else []
    proc = subprocess.Popen([sys.executable, "-m", "conveyor.cli", "--address", cli.address, *token,
                             "watch", run["id"]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli.env(),
                            cwd=cli.home)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        cli.ok("steps", "approve", run["id"], "gate")
        rest, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    out = first + rest
    lines = out.splitlines()
    # Off a terminal: the snapshot (the run, then each step), then one line per change.
    assert lines[0].startswith(f"run {run['id']} ({name}): ")
    assert re.search(r"^\d\d:\d\d:\d\d step child: failed attempt 1 ", out, re.M), out
    assert re.search(r"^\d\d:\d\d:\d\d run: failed", out, re.M), out
    assert "\x1b[" not in out
    # A finished run is drawn at once and the exit code says how it ended.
    again = cli.run("watch", run["id"])
    assert again.code == 1 and "): failed" in again.out.splitlines()[0]


def test_json_prints_each_stream_message_and_ends_with_the_final_run_event(cli: Cli, name: str) -> None:
    cli.apply(gated(name))
    run = cli.trigger(name)
    token = ["--token", cli.token] if cli.token else []
    proc = subprocess.Popen([sys.executable, "-m", "conveyor.cli", "--address", cli.address, *token,
                             "watch", run["id"], "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli.env(),
                            cwd=cli.home)
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["snapshot"]["run"]["id"] == run["id"]
        assert {s["step_ref"]: s["status"] for s in first["snapshot"]["steps"]}["gate"] == "waiting"
        cli.ok("steps", "approve", run["id"], "gate")
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    messages = [json.loads(line) for line in out.splitlines()]
    assert all(set(m) == {"event"} for m in messages)
    seqs = [m["event"]["seq"] for m in messages]
    assert seqs == sorted(seqs) and seqs[0] == first["snapshot"]["seq"] + 1
    assert messages[-1]["event"]["type"] == "run.completed"
    assert any(m["event"]["type"] == "step.completed" and m["event"]["step_ref"] == "gate" for m in messages)


def test_not_found_and_usage(cli: Cli) -> None:
    missing = cli.run("watch", "no-such-run")
    assert missing.code == 5 and missing.err.rstrip().endswith("(RUN_NOT_FOUND)")
    assert cli.run("watch").code == 2
    assert cli.run("watch", "some-run", "--project", "default").code == 2
    assert cli.run("watch", "some-run", "--status", "running").code == 2


def test_ctrl_c_exits_130_and_leaves_the_screen_usable(cli: Cli, name: str, terminal: Any) -> None:
    cli.apply(gated(name))
    run = cli.trigger(name)
    screen = terminal("watch", run["id"])
    screen.wait_for(r"^gate\s+approval\s+waiting")
    screen.proc.send_signal(signal.SIGINT)
    assert screen.exit_code() == 130
    assert "Traceback" not in screen.err
    assert "\x1b[?25h" in screen.raw  # the cursor is shown again


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(db_url: str, data_dir: Path, port: int, log_path: Path) -> subprocess.Popen[str]:
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "conveyor.cli", "serve", "--grpc-port", str(port), "--no-envoy",
             "--db-url", db_url, "--data-dir", str(data_dir)],
            stdout=subprocess.PIPE, stderr=log, text=True,
            # Its metrics on a free port: the module's server may hold the default one.
            env={**os.environ, "PYTHONUNBUFFERED": "1", "CONVEYOR_METRICS_PORT": "0"})
    _wait_for_address(proc, log_path)
    return proc


def test_the_watch_resumes_after_the_server_is_killed_and_restarted(cli: Cli, name: str, tmp_path: Path,
                                                                    terminal: Any) -> None:
    """A server of this test's own: SIGKILLed while the watch waits on an approval, restarted on
    the same port and database; the watch reconnects, resumes after the last seq it saw, and
    ends when the approved run completes."""
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'own.db'}"
    port = _free_port()
    data_dir, log_path = tmp_path / "data", tmp_path / "server.log"
    server = _serve(db_url, data_dir, port, log_path)
    own = Cli(f"127.0.0.1:{port}", data_dir, cli.home, server, log_path, db_url)
    try:
        own.apply(gated(name))
        run = own.trigger(name)
        screen = terminal("watch", run["id"], target=own)
        screen.wait_for(r"^gate\s+approval\s+waiting")

        server.kill()
        server.wait()
        screen.wait_for(r"connection to conveyor at .* lost; resuming")
        time.sleep(0.5)  # a few attempts fail while nothing listens
        assert screen.proc.poll() is None
        server = own.server = _serve(db_url, data_dir, port, log_path)

        own.ok("steps", "approve", run["id"], "gate")
        assert screen.exit_code() == 0, screen.err + own.health()
        frame = screen.last_frame
        assert re.search(r"\bcompleted\b", frame.splitlines()[0]), frame
        assert [r[2] for r in _step_rows(frame)] == ["completed", "completed"], frame
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_a_watch_resumed_before_the_final_event_ends_though_a_comment_follows_it(
        cli: Cli, name: str, tmp_path: Path) -> None:
    """The server is killed while the watch waits on an approval; meanwhile the run completes
    and gets a comment (through another server, on another port, over the same database). The
    watch resumes on its own port before the final event, gets it and the comment after it, and
    exits 0 (the server ends the stream by the run's status, not by the last event's type)."""
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'own.db'}"
    port = _free_port()
    data_dir, log_path = tmp_path / "data", tmp_path / "server.log"
    server = _serve(db_url, data_dir, port, log_path)
    own = Cli(f"127.0.0.1:{port}", data_dir, cli.home, server, log_path, db_url)
    try:
        own.apply(gated(name))
        run = own.trigger(name)
        watch = subprocess.Popen([sys.executable, "-m", "conveyor.cli", *_options(own), "watch", run["id"],
                                  "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=own.env(), cwd=cli.home)
        try:
            assert watch.stdout is not None
            snapshot = watch.stdout.readline()
            assert "snapshot" in json.loads(snapshot)
            server.kill()
            server.wait()

            aside_port = _free_port()
            aside = Cli(f"127.0.0.1:{aside_port}", data_dir, cli.home,
                        _serve(db_url, data_dir, aside_port, log_path), log_path, db_url)
            try:
                aside.ok("steps", "approve", run["id"], "gate")
                deadline = time.monotonic() + WAIT
                while aside.get_run(run["id"])["status"] != "completed":
                    assert time.monotonic() < deadline, "the approved run never completed"
                    time.sleep(0.1)
                aside.ok("runs", "comment", run["id"], "after the end")
            finally:
                aside.server.send_signal(signal.SIGTERM)
                aside.server.wait(timeout=15)

            server = own.server = _serve(db_url, data_dir, port, log_path)
            out, err = watch.communicate(timeout=WAIT)
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait()
        assert watch.returncode == 0, err
        assert "lost; resuming" in err
        messages = [json.loads(line) for line in [snapshot, *out.splitlines()] if line.strip()]
        events = [m["event"] for m in messages if "event" in m]
        start = int(messages[0]["snapshot"]["seq"])
        assert [int(e["seq"]) for e in events] == list(range(start + 1, start + 1 + len(events)))
        assert [e["type"] for e in events][-2:] == ["run.completed", "run.comment"]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_a_watch_that_cannot_resume_gives_up(cli: Cli, name: str, tmp_path: Path) -> None:
    """With the server gone for good the watch fails (exit 1) once RESUME_WITHIN has passed;
    here a short one, set on the module before the command runs."""
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'gone.db'}"
    port = _free_port()
    data_dir, log_path = tmp_path / "data", tmp_path / "server.log"
    server = _serve(db_url, data_dir, port, log_path)
    own = Cli(f"127.0.0.1:{port}", data_dir, cli.home, server, log_path, db_url)
    own.apply(gated(name))
    run = own.trigger(name)
    token = ["--token", own.token] if own.token else []
    script = ("import sys, conveyor.cli.watch as w; w.RESUME_WITHIN = 1.0; "
              "from conveyor.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", script, "--address", own.address, *token,
                             "watch", run["id"]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=own.env(),
                            cwd=own.home)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(f"run {run['id']}")
        server.kill()
        server.wait()
        _, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert "lost; resuming" in err
    assert err.rstrip().endswith("could not resume within 1 s (UNAVAILABLE)"), err


def test_project_watch_shows_runs_as_they_change(cli: Cli, name: str, terminal: Any) -> None:
    cli.apply(gated(name))
    before = cli.trigger(name)
    screen = terminal("watch", "--project", "default", "--workflow", name)
    screen.wait_for(rf"^{before['id']}\s+{name}\s+running")
    # A run triggered while it watches appears; an approved one turns completed.
    later = cli.trigger(name)
    screen.wait_for(rf"^{later['id']}\s+{name}\s+running")
    cli.ok("steps", "approve", before["id"], "gate")
    screen.wait_for(rf"^{before['id']}\s+{name}\s+completed")
    frame = screen.last_frame
    assert frame.index(later["id"]) < frame.index(before["id"])  # newest first
    screen.proc.send_signal(signal.SIGINT)
    assert screen.exit_code() == 130
    assert "Traceback" not in screen.err
    # Until the server streams project runs, the command says it polls instead.
    unimplemented = "UNIMPLEMENTED" in screen.err
    assert unimplemented == ("polling ListWorkflowRuns" in screen.err)


def test_project_watch_status_filter_off_a_terminal(cli: Cli, name: str) -> None:
    cli.apply(gated(name))
    token = ["--token", cli.token] if cli.token else []
    proc = subprocess.Popen([sys.executable, "-m", "conveyor.cli", "--address", cli.address, *token,
                             "watch", "--project", "default", "-w", name, "-s", "completed", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli.env(),
                            cwd=cli.home)
    try:
        run = cli.trigger(name)
        time.sleep(0.5)
        cli.ok("steps", "approve", run["id"], "gate")
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())  # the first run it shows is the completed one
        assert line["run"]["id"] == run["id"] and line["run"]["status"] == "completed"
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
