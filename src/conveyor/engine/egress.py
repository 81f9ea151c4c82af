"""Egress: the one address check on every connection the engine opens (http steps and
notification deliveries), and the aiohttp session that enforces it.

What may be reached is the domain's (domain/egress.py: `destination` reads the URL, host
normalised; `EgressPolicy.check` judges addresses); this module applies that check at the one
moment that matters, when a connection is opened, and makes the connection go where it was
checked. `EgressClient.request` takes a `Destination`, whose URL names the host in its canonical
spelling (the URL given to the client is verified to hold that very host, so no parser
difference between the check and the client can point it elsewhere):

- a host that is an IP address is checked as that address before the request (no resolver sees
  a literal);
- a host name is resolved once, by the session's resolver, when a connection is opened: refused
  if ANY resolved address is denied, else the connector gets exactly those vetted addresses to
  connect to — a DNS answer that changes between check and connect (rebinding) cannot redirect
  the request, and there is no second lookup. The URL keeps its name, so the Host header, TLS SNI
  and the certificate check are for the name, and pooled connections are per name (each was
  vetted when it was opened).

The client never uses a proxy (a proxy would make the proxy the only address checked) and never
follows a redirect (`allow_redirects=False` here, for every caller), so a 3xx cannot lead
anywhere unvetted either.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from types import ModuleType
from typing import Any

from conveyor.domain.egress import BadUrl, Destination, EgressPolicy

# host, port -> the addresses a connection may use, in the resolver's order.
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to for a TCP connection, without duplicates (OSError when
    it resolves to none)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def vetting_resolver(policy: EgressPolicy, resolver: Resolver = resolve) -> Any:
    """aiohttp's resolver, but a connection may go only to addresses the policy vetted: the
    connector connects to exactly what it returns, so what was checked is what is used. (An IP
    literal in a URL never reaches a resolver: `EgressClient.request` checks it.)"""
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
            self._policy.check(host, port, addresses)
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

    @contextlib.asynccontextmanager
    async def request(self, method: str, target: Destination, **options: Any) -> AsyncIterator[Any]:
        """The response to `method` on `target`, redirects not followed; EgressDenied (before
        any connection) when the policy refuses where it leads."""
        import yarl  # aiohttp's URL type, loaded with it

        if target.address is not None:
            self.policy.check(target.host, target.port, [str(target.address)])
        url = yarl.URL(target.url)
        if url.raw_host != target.host or url.port != target.port:
            # The client reads the URL otherwise than the check did: nothing to connect to.
            raise BadUrl("is read differently by the HTTP client")
        async with self._session_of().request(method, url, allow_redirects=False, **options) as response:
            yield response

    def _session_of(self) -> Any:
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
