"""Egress: where the engine's own `http` steps may connect, and the resolver that enforces it.

Owns the egress policy (Settings `http_allowed_hosts`, `http_denied_networks`) as a pure check
over a host name and its resolved addresses, and an aiohttp resolver that applies it at the one
moment that matters: when a connection is opened. It resolves the host once, refuses the
destination if ANY resolved address is in a denied network (or the host is not allowed), and
hands the connector exactly those vetted addresses to connect to — a DNS answer that changes
between the check and the connect (rebinding) cannot redirect the request. The URL keeps its
host name, so the Host header, TLS SNI and the certificate check are for the name, and pooled
connections are per name (each was vetted when it was opened). A URL naming an IP address is
checked as that address (`check_literal`), since no resolver sees it.

The client never uses a proxy (a proxy would make the proxy the only address checked); the
executor does not follow redirects, so a 3xx cannot lead anywhere unvetted either.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

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
    """Every address `host` resolves to for a TCP connection, without duplicates (OSError when
    it resolves to none)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def vetting_resolver(policy: EgressPolicy, resolver: Resolver = resolve) -> Any:
    """aiohttp's resolver, but a connection may go only to addresses the policy vetted: the
    connector connects to exactly what it returns, so what was checked is what is used. (An IP
    literal in a URL never reaches a resolver: `check_literal` covers it.)"""
    return _resolver_class()(policy, resolver)


@functools.cache
def _resolver_class() -> Any:
    # aiohttp weighs ~25 MB: imported when the first http step runs, not when the server starts.
    import aiohttp.abc

    class VettingResolver(aiohttp.abc.AbstractResolver):
        def __init__(self, policy: EgressPolicy, resolver: Resolver) -> None:
            self._policy = policy
            self._resolve = resolver

        async def resolve(self, host: str, port: int = 0,
                          family: socket.AddressFamily = socket.AF_INET) -> list[aiohttp.abc.ResolveResult]:
            addresses = await self._resolve(host, port)
            self._policy.check(host, addresses)
            return [{"hostname": host, "host": address, "port": port,
                     "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                     "proto": 0, "flags": socket.AI_NUMERICHOST} for address in addresses]

        async def close(self) -> None:
            return None

    return VettingResolver


def aiohttp_module() -> ModuleType:
    """aiohttp, imported when the engine first makes a request (an http step, a notification):
    it weighs ~25 MB of memory a server that makes none need not carry (idle RSS < 100 MB)."""
    import aiohttp
    return aiohttp


class EgressClient:
    """One aiohttp session for every request an engine component makes, made on first use (in
    the loop): pooled keep-alive connections, at most `limit`; every new connection vetted by
    the policy (aiohttp's DNS cache is off, so each is resolved and checked afresh); no proxies
    from the environment (trust_env=False: a proxy would bypass the check of the destination)."""

    def __init__(self, policy: EgressPolicy, resolver: Resolver, limit: int) -> None:
        self.policy = policy
        self._resolver = resolver
        self._limit = limit
        self._session: Any = None

    def session(self) -> Any:
        if self._session is None:
            aiohttp = aiohttp_module()
            connector = aiohttp.TCPConnector(limit=self._limit, use_dns_cache=False,
                                             resolver=vetting_resolver(self.policy, self._resolver),
                                             keepalive_timeout=5.0)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def check_literal(policy: EgressPolicy, host: str) -> None:
    """A URL whose host is an IP address is connected to as it is: check that address."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return  # a name: the resolver vets it when a connection is opened
    policy.check(host, [host.strip("[]")])
