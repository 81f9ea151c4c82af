"""Egress: where the engine's own `http` steps may connect, and the transport that enforces it.

Owns the egress policy (Settings `http_allowed_hosts`, `http_denied_networks`) as a pure check
over a host name and its resolved addresses, and an httpx transport that applies it at the one
moment that matters: when a connection is opened. The transport's network backend resolves the
host once, refuses the destination if ANY resolved address is in a denied network (or the host
is not allowed), and connects to one of exactly those vetted addresses — a DNS answer that
changes between the check and the connect (rebinding) cannot redirect the request. The URL keeps
its host name, so the Host header, TLS SNI and the certificate check are for the name, and pooled
connections are per name (each was vetted when it was opened).

The transport never uses a proxy (a proxy would make the proxy the only address checked); the
executor does not follow redirects, so a 3xx cannot lead anywhere unvetted either.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> the addresses a connection may use, in the resolver's order.
Resolver = Callable[[str, int], Awaitable[list[str]]]

# The stable reason a refused destination's error starts with (the step's error names it).
EGRESS_DENIED = "EGRESS_DENIED"


class EgressDenied(Exception):
    """The policy refuses this destination; retrying cannot change that."""


@dataclass(frozen=True)
class EgressPolicy:
    """Allowed host names ("api.example.com", "*.example.com" for its subdomains) and networks
    (CIDR: a host is allowed when every address it resolves to is inside one); empty = any
    host. Denied networks win over allowed ones."""

    allowed_names: frozenset[str] = frozenset()
    allowed_suffixes: tuple[str, ...] = ()
    allowed_networks: tuple[IPNetwork, ...] = ()
    denied_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, allowed_hosts: Iterable[str], denied_networks: Iterable[str]) -> EgressPolicy:
        """The policy from its Settings strings; ValueError names a malformed entry."""
        names: set[str] = set()
        suffixes: list[str] = []
        networks: list[IPNetwork] = []
        for entry in (h.strip().lower().rstrip(".") for h in allowed_hosts):
            if entry.startswith("*."):
                suffixes.append(entry[1:])  # ".example.com": subdomains only, not the apex
            elif (network := _network_or_none(entry)) is not None:
                networks.append(network)
            elif entry:
                names.add(entry)
        denied = []
        for entry in denied_networks:
            network = _network_or_none(entry.strip())
            if network is None:
                raise ValueError(f"http_denied_networks: {entry!r} is not an IP network")
            denied.append(network)
        return cls(frozenset(names), tuple(suffixes), tuple(networks), tuple(denied))

    @property
    def allows_any_host(self) -> bool:
        return not (self.allowed_names or self.allowed_suffixes or self.allowed_networks)

    def check(self, host: str, addresses: Sequence[str]) -> None:
        """Raise EgressDenied unless `host`, resolved to `addresses`, may be reached."""
        ips = [_ip(a) for a in addresses]
        for ip in ips:
            for network in self.denied_networks:
                if ip in network:
                    raise EgressDenied(f"{EGRESS_DENIED}: {host} resolves to {ip}, in denied network "
                                       f"{network}")
        if self.allows_any_host:
            return
        name = host.lower().rstrip(".")
        if name in self.allowed_names or name.endswith(self.allowed_suffixes):
            return
        if ips and all(any(ip in n for n in self.allowed_networks) for ip in ips):
            return
        raise EgressDenied(f"{EGRESS_DENIED}: host {host} is not in http_allowed_hosts")


def _network_or_none(text: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def _ip(address: str) -> IPAddress:
    ip = ipaddress.ip_address(address)
    # ::ffff:169.254.169.254 reaches the IPv4 address: judge it as that address.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to for a TCP connection, without duplicates."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise httpcore.ConnectError(f"cannot resolve {host}: {e.strerror}") from e
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _VettingBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, but a TCP connection goes only to addresses the policy
    vetted, and never over a Unix socket."""

    def __init__(self, policy: EgressPolicy, resolver: Resolver) -> None:
        self._policy = policy
        self._resolve = resolver
        self._inner = httpcore.AnyIOBackend()

    # The signatures are httpcore's (it passes `timeout` by name), hence the noqa.
    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        addresses = await self._resolve(host, port)
        self._policy.check(host, addresses)
        error: Exception = httpcore.ConnectError(f"{host} resolves to no address")
        for address in addresses:  # the resolver's order, as a plain connect would try them
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                error = e
        raise error

    async def connect_unix_socket(self, path: str, timeout: float | None = None,  # noqa: ASYNC109
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise EgressDenied(f"{EGRESS_DENIED}: unix sockets are not an http step destination")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, inner: Any) -> None:  # httpcore's response stream
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class EgressTransport(httpx.AsyncBaseTransport):
    """An httpx transport over httpcore's connection pool with the vetting backend. httpcore's
    own errors (ConnectError, ReadTimeout, ...) reach the caller as they are; EgressDenied
    passes through the pool untouched."""

    def __init__(self, policy: EgressPolicy, max_connections: int, resolver: Resolver = resolve) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=max_connections, max_keepalive_connections=max_connections,
            keepalive_expiry=5.0, network_backend=_VettingBackend(policy, resolver))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        response = await self._pool.handle_async_request(httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host,
                             port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw, content=request.stream, extensions=request.extensions))
        return httpx.Response(status_code=response.status, headers=response.headers,
                              stream=_ResponseStream(response.stream), extensions=response.extensions)

    async def aclose(self) -> None:
        await self._pool.aclose()
