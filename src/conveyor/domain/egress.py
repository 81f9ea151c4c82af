"""Egress: which destinations the engine's outgoing requests (http steps, notifications) may reach
(SPEC §11; README "Egress").

Owns, purely, the two halves of the one address check the engine applies to every connection it
opens (engine/egress.py does the I/O):

- `destination`: the one reading of an outgoing URL. The host is normalised as browsers and the
  HTTP client read it (WHATWG URL): percent-decoded, mapped by UTS-46 (fullwidth forms, the
  ideographic and fullwidth full stops as dots, case folded), and a host that ends in a number
  is an IPv4 address in any spelling `inet_aton` accepts (decimal `2130706433`, hex `0x7f.1`,
  octal `0177.0.0.1`, short `127.1`) — or no URL at all. The URL handed to the client names the
  host in that canonical spelling, so what was checked is what is connected to. A malformed URL
  is `BadUrl` with a description fit for a field violation.
- `EgressPolicy`: special-purpose addresses (loopback, private, link-local, CGNAT, multicast,
  unspecified, documentation, reserved... and IPv6 addresses that reach one through IPv4-mapped,
  NAT64 or 6to4 forms) are denied unless `CONVEYOR_HTTP_ALLOW` names them (hosts, host:port,
  networks); every public address is allowed.

Why the `idna` package (uts46=True): UTS-46 is the mapping the WHATWG URL standard (and yarl,
aiohttp's URL parser) applies to hosts; `idna` is its maintained implementation, its tables
kept up with Unicode. Python's own `encodings.idna` is IDNA 2003 and maps differently; a
hand-written table of "dot-like" and "digit-like" characters would be one more to get wrong.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

import idna

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The stable reason a refused destination's error starts with (the step's error names it).
EGRESS_DENIED = "EGRESS_DENIED"
# The setting that allows special-purpose destinations (named in refusals).
ALLOW_SETTING = "CONVEYOR_HTTP_ALLOW"

_DEFAULT_PORTS = {"http": 80, "https": 443}
# A host name's ASCII label: letters, digits, hyphens inside, underscores (service names in
# container networks have them).
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_HEX = re.compile(r"^0[xX][0-9a-fA-F]*$")


class BadUrl(ValueError):
    """The text is not a URL the engine can request; str() says why (a field violation's
    description: "must be ...", "is ...")."""


class EgressDenied(Exception):
    """The policy refuses this destination; retrying cannot change that."""


@dataclass(frozen=True)
class Destination:
    """Where a URL leads: `url` is the URL to request, as given but with its host in the
    canonical spelling (and no fragment); `host` is that spelling (an ASCII lower-case name
    without a trailing dot, or an IP address, IPv6 without brackets), `address` the IP address
    when the host is one."""

    url: str
    scheme: str
    host: str
    port: int
    address: IPAddress | None


def destination(url: str, max_length: int) -> Destination:
    """The destination `url` names; BadUrl says what is wrong with it."""
    if len(url) > max_length:
        raise BadUrl(f"is {len(url)} characters; at most {max_length} are allowed")
    # Control characters (NUL included) or spaces would be refused by the database or split the
    # request line; a URL has none once encoded. (urlsplit would quietly drop some of them.)
    if any(ch <= " " or ch == "\x7f" for ch in url):
        raise BadUrl("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise BadUrl("is not a valid URL") from None
    if parts.scheme not in _DEFAULT_PORTS or not parts.netloc:
        raise BadUrl("must be an absolute http or https URL")
    userinfo, at, hostport = parts.netloc.rpartition("@")
    raw_host, port = _split_port(hostport, _DEFAULT_PORTS[parts.scheme])
    host, address = canonical_host(raw_host)
    shown = f"[{host}]" if isinstance(address, ipaddress.IPv6Address) else host
    netloc = f"{userinfo}{at}{shown}" + (f":{port}" if port != _DEFAULT_PORTS[parts.scheme] else "")
    return Destination(urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")),
                       parts.scheme, host, port, address)


def url_problem(url: str, max_length: int) -> str | None:
    """Why `url` is no URL the engine can request (a field violation's description), or None."""
    try:
        destination(url, max_length)
    except BadUrl as e:
        return str(e)
    return None


def _split_port(hostport: str, default: int) -> tuple[str, int]:
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise BadUrl("is not a valid URL: '[' without ']'")
        host, rest = hostport[:end + 1], hostport[end + 1:]
        if rest and not rest.startswith(":"):
            raise BadUrl("is not a valid URL: text after the IPv6 address")
        port = rest[1:]
    else:
        host, _, port = hostport.partition(":")
        if ":" in port:
            raise BadUrl("is not a valid URL: an IPv6 address must be in brackets")
    if not port:
        return host, default
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise BadUrl("has an invalid port (1-65535)")
    return host, int(port)


def canonical_host(text: str) -> tuple[str, IPAddress | None]:
    """A URL's host as it is connected to: (its canonical spelling, its IP address if it is
    one). BadUrl when it is neither a valid name nor a valid address."""
    if text.startswith("["):
        if not text.endswith("]"):
            raise BadUrl("is not a valid URL: '[' without ']'")
        try:
            v6 = ipaddress.IPv6Address(text[1:-1])
        except ValueError:
            raise BadUrl("has an invalid IPv6 address") from None
        if v6.scope_id:
            raise BadUrl("must not name an IPv6 zone")
        return v6.compressed, v6
    try:
        mapped = idna.uts46_remap(unquote(text, errors="strict"), std3_rules=False, transitional=False)
    except (UnicodeError, idna.IDNAError):
        raise BadUrl("has an invalid host name") from None
    labels = mapped.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()  # one trailing dot: the same host
    if not mapped or not labels[-1]:
        raise BadUrl("must name a host")
    if (labels[-1].isascii() and labels[-1].isdigit()) or _HEX.match(labels[-1]):
        v4 = _ipv4(labels)
        if v4 is None:
            raise BadUrl("has an invalid IPv4 address")
        return str(v4), v4
    out: list[str] = []
    for label in labels:
        if not label.isascii():
            try:
                label = idna.alabel(label).decode()
            except (UnicodeError, idna.IDNAError):
                raise BadUrl("has an invalid host name") from None
        if not _LABEL.match(label):
            raise BadUrl("has an invalid host name")
        out.append(label)
    name = ".".join(out)
    if len(name) > 253:
        raise BadUrl("has a host name over 253 characters")
    return name, None


def _ipv4(labels: Sequence[str]) -> ipaddress.IPv4Address | None:
    """The IPv4 address of a host that ends in a number, read as WHATWG's IPv4 parser (and
    inet_aton) reads it; None when it is not one."""
    if len(labels) > 4:
        return None
    numbers: list[int] = []
    for label in labels:
        if _HEX.match(label):
            number = int(label[2:] or "0", 16)
        elif not (label.isascii() and label.isdigit()):
            return None
        elif len(label) > 1 and label.startswith("0"):
            if not set(label) <= set("01234567"):
                return None
            number = int(label, 8)
        else:
            number = int(label)
        numbers.append(number)
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        return None
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


# -- what is denied ------------------------------------------------------------------------------

def _table(entries: Iterable[tuple[str, str]]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(net), why) for net, why in entries)


# The IANA special-purpose address registries (RFC 6890 and its updates), by what each is.
_DENIED_V4 = _table((
    ("0.0.0.0/8", "'this network' (0.0.0.0/8)"),
    ("10.0.0.0/8", "private (10.0.0.0/8)"),
    ("100.64.0.0/10", "shared, CGNAT (100.64.0.0/10)"),
    ("127.0.0.0/8", "loopback (127.0.0.0/8)"),
    ("169.254.0.0/16", "link-local, cloud metadata (169.254.0.0/16)"),
    ("172.16.0.0/12", "private (172.16.0.0/12)"),
    ("192.0.0.0/24", "IETF protocol assignments (192.0.0.0/24)"),
    ("192.0.2.0/24", "documentation (192.0.2.0/24)"),
    ("192.88.99.0/24", "6to4 relay anycast (192.88.99.0/24)"),
    ("192.168.0.0/16", "private (192.168.0.0/16)"),
    ("198.18.0.0/15", "benchmarking (198.18.0.0/15)"),
    ("198.51.100.0/24", "documentation (198.51.100.0/24)"),
    ("203.0.113.0/24", "documentation (203.0.113.0/24)"),
    ("224.0.0.0/4", "multicast (224.0.0.0/4)"),
    ("240.0.0.0/4", "reserved, broadcast (240.0.0.0/4)"),
))
_DENIED_V6 = _table((
    ("::/128", "unspecified (::)"),
    ("::1/128", "loopback (::1)"),
    ("::/96", "IPv4-compatible (::/96)"),
    ("64:ff9b:1::/48", "local-use NAT64 (64:ff9b:1::/48)"),
    ("100::/64", "discard-only (100::/64)"),
    ("2001::/23", "IETF protocol assignments, Teredo (2001::/23)"),
    ("2001:db8::/32", "documentation (2001:db8::/32)"),
    ("3fff::/20", "documentation (3fff::/20)"),
    ("5f00::/16", "segment routing (5f00::/16)"),
    ("fc00::/7", "unique local, ULA (fc00::/7)"),
    ("fe80::/10", "link-local (fe80::/10)"),
    ("fec0::/10", "site-local (fec0::/10)"),
    ("ff00::/8", "multicast (ff00::/8)"),
))
# Every IPv6 unicast address on the internet is in 2000::/3; anything else not named above is
# reserved by the IETF.
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
# IPv6 forms that reach an IPv4 address: they are judged as the address they reach.
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def reached_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches through IPv4-mapped, NAT64 or 6to4 forms."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip in _MAPPED or ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def denial(ip: IPAddress) -> str | None:
    """What special-purpose range `ip` is in ("loopback (127.0.0.0/8)"), or None: public."""
    if isinstance(ip, ipaddress.IPv6Address):
        v4 = reached_ipv4(ip)
        if v4 is not None and (why := denial(v4)) is not None:
            return f"{why}, reached as {v4}"
        if ip in _MAPPED or ip in _NAT64:
            return None
        table: tuple[tuple[IPNetwork, str], ...] = _DENIED_V6
    else:
        table = _DENIED_V4
    for network, why in table:
        if ip in network:
            return why
    if isinstance(ip, ipaddress.IPv6Address) and ip not in _GLOBAL_UNICAST:
        return "reserved, not global unicast (outside 2000::/3)"
    return None


# -- the policy ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Allowed:
    """One CONVEYOR_HTTP_ALLOW entry: a network, a host name or a `*.suffix`, on one port or
    any (None)."""

    network: IPNetwork | None = None
    name: str = ""
    suffix: str = ""
    port: int | None = None

    def allows(self, host: str, port: int, ip: IPAddress) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            v4 = reached_ipv4(ip)
            return ip in self.network or (v4 is not None and v4 in self.network)
        return host == self.name if self.name else host.endswith(self.suffix)


@dataclass(frozen=True)
class EgressPolicy:
    """Public addresses are allowed; special-purpose ones (`denial`) only when an entry of
    CONVEYOR_HTTP_ALLOW allows them: an address or network (`127.0.0.1`, `10.0.0.0/8`), a host
    name (`localhost`: whatever it resolves to) or `*.example.com` (its subdomains), each
    optionally on one port (`127.0.0.1:9000`, `[::1]:9000`, `localhost:9000`)."""

    allowed: tuple[_Allowed, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> EgressPolicy:
        """The policy from the setting's entries; ValueError names a malformed one."""
        return cls(tuple(_entry(e.strip()) for e in entries if e.strip()))

    def check(self, host: str, port: int, addresses: Sequence[str]) -> None:
        """Raise EgressDenied unless every address of `addresses` (what `host` resolves to, or
        the host itself when it is an address) may be reached on `port`."""
        for text in addresses:
            ip = ipaddress.ip_address(text)
            why = denial(ip)
            if why is None or any(a.allows(host, port, ip) for a in self.allowed):
                continue
            subject = f"{host} is" if host == str(ip) else f"{host} resolves to {ip},"
            raise EgressDenied(f"{EGRESS_DENIED}: {subject} {why}, not allowed by {ALLOW_SETTING}")


def _entry(text: str) -> _Allowed:
    bad = ValueError(f"{ALLOW_SETTING}: {text!r} is not a host, host:port, or network")
    if "/" in text:
        try:
            return _Allowed(network=ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise bad from None
    try:  # a bare IPv6 address ("::1") holds colons that are no port
        ip = ipaddress.ip_address(text)
        return _Allowed(network=ipaddress.ip_network(ip))
    except ValueError:
        pass
    suffix = text.startswith("*.")
    try:
        raw, port = _split_port(text[2:] if suffix else text, 0)
        host, address = canonical_host(raw)
    except BadUrl:
        raise bad from None
    if address is not None and not suffix:
        return _Allowed(network=ipaddress.ip_network(address), port=port or None)
    if address is not None:
        raise bad
    if suffix:
        return _Allowed(suffix=f".{host}", port=port or None)
    return _Allowed(name=host, port=port or None)
