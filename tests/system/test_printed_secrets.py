"""Nothing secret printed or logged, and anonymous traffic bounded, on a real `conveyor serve` with
its Envoy (SPEC §11).

Piped (a container's log), the first start prints the path of the admin token, not the token, and
the database URL with its password masked (PostgreSQL: trust auth takes any password, so the URL
carries one); on a terminal the token is shown once, with the dashboard's sign-in link. Forged
tokens with odd bytes, over raw HTTP/2 to the gRPC port (grpc's own client refuses to send them)
and over REST through Envoy, are refused and appear in no log line. Through Envoy, a burst without
a key from one client address is limited while another address is not, whatever x-forwarded-for
the client sends; unknown webhook tokens likewise; none of it reaches the audit log.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2

from conveyor.v1 import workflows_service_pb2 as wf_pb
from tests.system.conftest import SpawnFactory

TOKEN = re.compile(r"cvk_[A-Za-z0-9_-]{43}")
PASSWORD = "s3cret-pw"
START_TIMEOUT = 30.0
# A marker no log line can hold unless it quotes a forged token.
FORGED = "cvk_FORGEDtokenTEXT"


def with_password(db_url: str) -> str:
    """The suite's database URL, with a password when it is PostgreSQL's (trust auth)."""
    return db_url.replace("://postgres@", f"://postgres:{PASSWORD}@", 1)


async def test_piped_output_names_the_token_file_and_masks_the_password(
        spawn: SpawnFactory, tmp_path: Path, db_url: str, backend: str) -> None:
    url = with_password(db_url)
    async with spawn(url, envoy=True) as served:
        token = served.token
        assert TOKEN.fullmatch(token)
        lines = list(served.printed)
        assert served.proc.stdout is not None
        while not lines[-1].startswith("conveyor: database"):  # printed after the REST line
            lines.append((await asyncio.wait_for(served.proc.stdout.readline(), 10)).decode().rstrip())
        printed = "\n".join(lines)
        assert f"its token is in {served.data_dir / 'admin.token'}" in printed
        async with httpx.AsyncClient(base_url=served.rest_url, headers=served.headers) as client:
            assert (await client.get("/v1/workflows")).status_code == 200
    out = printed + (tmp_path / "server.log").read_text()
    assert token not in out and PASSWORD not in out
    if backend == "postgresql":
        assert f"database {url.replace(PASSWORD, '***')}" in printed, printed
    else:
        assert f"database {url}" in printed, printed


def test_on_a_terminal_the_first_start_shows_the_token_once(tmp_path: Path, db_url: str) -> None:
    primary, secondary = os.openpty()
    data_dir = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor.cli", "serve", "--grpc-port", "0", "--http-port", "0",
         "--db-url", with_password(db_url), "--data-dir", str(data_dir)],
        stdin=subprocess.DEVNULL, stdout=secondary, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb"})
    os.close(secondary)
    seen = b""
    try:
        while b"conveyor: database" not in seen:
            ready, _, _ = select.select([primary], [], [], START_TIMEOUT)
            assert ready, seen
            chunk = os.read(primary, 65536)
            assert chunk, seen
            seen += chunk
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        os.close(primary)
    text = seen.decode().replace("\r\n", "\n")
    token = (data_dir / "admin.token").read_text().strip()
    assert text.count(token) == 2, text  # alone on its line, and in the sign-in link
    assert f"\n{token}\n" in text
    assert re.search(rf"dashboard on http://\S+/ui/#token={token}\n", text), text
    assert PASSWORD not in text


def grpc_call(port: int, authorization: bytes) -> tuple[str, str]:
    """GetWorkflow over raw HTTP/2 with this authorization header, whatever bytes it holds: the
    grpc-status and ErrorInfo reason, or ("reset", "") when the server refused the stream."""
    config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False,
                                       normalize_outbound_headers=False, header_encoding=None)
    conn = h2.connection.H2Connection(config)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        conn.initiate_connection()
        message = wf_pb.GetWorkflowRequest(workflow_id="x").SerializeToString()
        conn.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"conveyor"),
                              (b":path", b"/conveyor.v1.WorkflowsService/GetWorkflow"),
                              (b"content-type", b"application/grpc"), (b"te", b"trailers"),
                              (b"authorization", authorization)])
        conn.send_data(1, b"\x00" + len(message).to_bytes(4, "big") + message, end_stream=True)
        sock.sendall(conn.data_to_send())
        headers: dict[bytes, bytes] = {}
        while True:
            data = sock.recv(65536)
            if not data:
                return "reset", ""
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    headers.update(dict(event.headers))
                elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                    return "reset", ""
                elif isinstance(event, h2.events.StreamEnded):
                    return headers[b"grpc-status"].decode(), _reason(headers)
            sock.sendall(conn.data_to_send())


def _reason(headers: dict[bytes, bytes]) -> str:
    raw = headers.get(b"grpc-status-details-bin")
    if raw is None:
        return ""
    status = status_pb2.Status.FromString(base64.b64decode(raw + b"=" * (-len(raw) % 4)))
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


ODD_VALUES = [b"\xff", b"\x80\x81", b"\xc3\xa9", b"\n", b"\r\nx-evil: 1", b"\x00", b"\x7f", b" tail\x01"]


async def test_forged_tokens_with_odd_bytes_are_refused_and_never_logged(
        spawn: SpawnFactory, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_ANONYMOUS_RATE_LIMIT", "0")  # every call reaches the gate's verdict
    async with spawn(db_url, envoy=True) as served:
        port = int(served.grpc_target.rsplit(":", 1)[1])
        for odd in ODD_VALUES:
            for value in (b"Bearer " + FORGED.encode() + odd, b"Bearer " + odd + FORGED.encode()):
                code, reason = await asyncio.to_thread(grpc_call, port, value)
                # Refused: UNAUTHENTICATED MALFORMED_TOKEN, or the stream itself by grpc's HTTP/2
                # layer (a line break or NUL is no header value at all).
                assert code == "reset" or (code, reason) == ("16", "MALFORMED_TOKEN"), (value, code, reason)
        async with httpx.AsyncClient(base_url=served.rest_url) as client:
            for odd in (b"\xff", b"\x80", b"\xc3\xa9", b"\x01", b"\x7f"):
                r = await client.get("/v1/workflows", headers=[(b"authorization",
                                                               b"Bearer " + FORGED.encode() + odd)])
                assert r.status_code in (400, 401), r.text
                assert FORGED not in r.text
        # Still serving, and the refusals were counted.
        async with httpx.AsyncClient(base_url=served.rest_url, headers=served.headers) as client:
            assert (await client.get("/v1/workflows")).status_code == 200
        metrics = await _metrics(served.printed)
        assert 'conveyor_refused_requests_total{reason="MALFORMED_TOKEN"}' in metrics
    log = (tmp_path / "server.log").read_text(errors="replace")
    log += (served.data_dir / "envoy" / "envoy.log").read_text(errors="replace")
    assert "FORGED" not in log and "Traceback" not in log, log[-3000:]


async def _metrics(printed: list[str]) -> str:
    url = next(m.group(1) for line in printed if (m := re.search(r"metrics on (\S+)", line)))
    async with httpx.AsyncClient() as client:
        return (await client.get(url)).text


def _from(address: str) -> httpx.AsyncHTTPTransport:
    return httpx.AsyncHTTPTransport(local_address=address)


async def test_anonymous_bursts_are_limited_per_client_address_through_envoy(
        spawn: SpawnFactory, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """127.0.0.2 and 127.0.0.3 are loopback addresses of their own (Linux routes 127/8 to lo);
    Envoy appends each connection's address to x-forwarded-for, which the server believes
    beside the gateway's secret."""
    monkeypatch.setenv("CONVEYOR_ANONYMOUS_RATE_LIMIT", "2")
    monkeypatch.setenv("CONVEYOR_WEBHOOK_RATE_LIMIT", "2")
    async with spawn(db_url, envoy=True) as served:
        async def burst(address: str, path: str, method: str = "GET", **headers: str) -> list[int]:
            async with httpx.AsyncClient(base_url=served.rest_url, transport=_from(address)) as c:
                return [(await c.request(method, path, headers=headers, json={} if method == "POST" else None)
                         ).status_code for _ in range(8)]

        first = await burst("127.0.0.2", "/v1/workflows")
        assert first[0] == 401 and 429 in first, first
        # The same address claiming to be others through x-forwarded-for: still limited.
        forged = await burst("127.0.0.2", "/v1/workflows", **{"x-forwarded-for": "198.51.100.1",
                                                               "x-conveyor-gateway": "guess"})
        assert forged[0] == 429, forged
        # Another address is not.
        assert (await burst("127.0.0.3", "/v1/workflows"))[0] == 401
        # Unknown webhook tokens, per address too.
        hooks = await burst("127.0.0.4", "/v1/webhooks/whk_" + "x" * 43, method="POST")
        assert hooks[0] == 404 and 429 in hooks, hooks
        assert (await burst("127.0.0.5", "/v1/webhooks/whk_" + "y" * 43, method="POST"))[0] == 404

        async with httpx.AsyncClient(base_url=served.rest_url, headers=served.headers) as admin:
            # The working key is not refused, though 127.0.0.1 is where it comes from too.
            audit = await admin.get("/v1/audit-entries", params={"failures_only": "true"})
            assert audit.status_code == 200 and audit.json() == [], audit.text
        metrics = await _metrics(served.printed)
        assert 'conveyor_refused_requests_total{reason="RATE_LIMITED"}' in metrics
        assert 'conveyor_refused_requests_total{reason="WEBHOOK_NOT_FOUND"}' in metrics
