"""Where a call comes from: the client address that the per-address limits on anonymous traffic
(api/access.py) count by.

A call straight to the gRPC port comes from its connection's peer. A REST call comes through
this server's Envoy, which connects from loopback: its client is the address Envoy appended to
`x-forwarded-for` (`use_remote_address`, envoy/envoy.yaml.tmpl), the header's LAST entry; the
entries before it are whatever the client sent. The header is believed only when the call also
carries `x-conveyor-gateway` with the secret this start of the server gave its Envoy
(`Settings.gateway_secret`, written only into Envoy's config, which Envoy overwrites on every
request it forwards), on a loopback connection. Loopback alone is not proof: any process on the
machine connects from there too, and can send whatever x-forwarded-for it likes.

IPv6 clients are counted by their /64 network, which one host commonly holds whole.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote

GATEWAY_HEADER = "x-conveyor-gateway"
FORWARDED_HEADER = "x-forwarded-for"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_address(metadata: Sequence[tuple[str, Any]], peer: str, gateway_secret: str) -> str:
    """The address (IPv4, or IPv6 /64 network) a call is counted under; `peer` is grpc's
    `context.peer()` ("ipv4:127.0.0.1:5000", "ipv6:%5B::1%5D:5000", "unix:/path")."""
    direct = _peer_ip(peer)
    if gateway_secret and direct is not None and direct.is_loopback:
        proof = _last(metadata, GATEWAY_HEADER)
        if proof is not None and hmac.compare_digest(proof.encode(), gateway_secret.encode()):
            forwarded = _ip((_last(metadata, FORWARDED_HEADER) or "").rsplit(",", 1)[-1])
            if forwarded is not None:
                return _counted(forwarded)
    return _counted(direct) if direct is not None else peer


def _last(metadata: Sequence[tuple[str, Any]], name: str) -> str | None:
    found = None
    for key, value in metadata:
        if key == name and isinstance(value, str):
            found = value
    return found


def _peer_ip(peer: str) -> IPAddress | None:
    kind, _, rest = unquote(peer).partition(":")
    if kind == "ipv4":
        return _ip(rest.rpartition(":")[0])
    if kind == "ipv6":
        return _ip(rest.rpartition(":")[0].strip("[]"))
    return None


def _ip(text: str | None) -> IPAddress | None:
    try:
        return ipaddress.ip_address((text or "").strip())
    except ValueError:
        return None


def _counted(ip: IPAddress) -> str:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
