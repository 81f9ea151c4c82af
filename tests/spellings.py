"""Hypothesis strategies for URLs that name a denied address in every spelling a URL parser (or
`inet_aton`, or getaddrinfo) would connect to it by, and for URLs of public addresses
(issue 16 item 1; tests/domain/test_egress.py and tests/engine/test_egress.py use them).

Each strategy draws `(url, address)`: the URL and the IP address it leads to, so a test can say
both "refused" and "refused as that address". Spellings: dotted, one number, two and three
parts, each part in decimal, hex (any case, zero-padded) or octal; IPv6 forms that reach IPv4
(mapped, 6to4, NAT64, IPv4-compatible) and denied IPv6 ranges. Decorations: the ideographic and
fullwidth full stops for dots, fullwidth digits and letters, upper and lower case, a trailing
dot, percent-encoding, userinfo (`http://a@127.0.0.1/`), explicit ports.
"""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA = ipaddress.IPv4Address("169.254.169.254")
DENIED_V4 = [ipaddress.IPv4Network(n) for n in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10",
    "0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4")]
DENIED_V6 = [ipaddress.IPv6Network(n) for n in ("::1/128", "::/128", "fe80::/10", "fc00::/7", "ff00::/8")]
DOTS = [".", "\u3002", "\uff0e", "\uff61"]  # full stop, ideographic, fullwidth, halfwidth ideographic


def _in(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> st.SearchStrategy[IPAddress]:
    first, last = int(network.network_address), int(network.broadcast_address)
    return st.integers(first, last).map(type(network.network_address))


denied_v4 = st.one_of(st.just(METADATA), st.sampled_from(DENIED_V4).flatmap(_in))
denied_v6 = st.sampled_from(DENIED_V6).flatmap(_in)
# Public blocks holding no special-purpose range (drawn from, not filtered: a filter of random
# addresses would discard too many of the small numbers Hypothesis favours).
PUBLIC_V4 = [ipaddress.IPv4Network(f"{first}.0.0.0/8")
             for first in (1, 8, 23, 45, 93, 104, 142, 151, 185, 223)]
PUBLIC_V6 = [ipaddress.IPv6Network(n) for n in ("2400::/12", "2600::/12", "2a00::/12", "2c00::/12")]
public_v4 = st.sampled_from(PUBLIC_V4).flatmap(_in)
public_v6 = st.sampled_from(PUBLIC_V6).flatmap(_in)


@st.composite
def _number(draw: st.DrawFn, value: int) -> str:
    """`value` in decimal, hex (any case, maybe zero-padded) or octal, as inet_aton reads them."""
    radix = draw(st.sampled_from(["dec", "hex", "oct"]))
    if radix == "hex":
        digits = "0" * draw(st.integers(0, 3)) + format(value, "x")
        prefix = draw(st.sampled_from(["0x", "0X"]))
        return prefix + "".join(c.upper() if draw(st.booleans()) else c for c in digits)
    if radix == "oct":
        return "0" * draw(st.integers(1, 3)) + format(value, "o")
    return str(value)


@st.composite
def v4_spelling(draw: st.DrawFn, ip: ipaddress.IPv4Address) -> str:
    """`ip` spelled in 1 to 4 parts, each in any radix, then dressed in Unicode."""
    n = int(ip)
    octets = list(ip.packed)
    parts = draw(st.sampled_from([1, 2, 3, 4]))
    values = {1: [n], 2: [octets[0], n & 0xFFFFFF], 3: [octets[0], octets[1], n & 0xFFFF], 4: octets}[parts]
    host = ".".join(draw(_number(v)) for v in values)
    return draw(_dressed(host))


@st.composite
def _dressed(draw: st.DrawFn, host: str) -> str:
    """The same host as a browser reads it: other dots, fullwidth forms, case, a trailing dot,
    percent-encoded characters."""
    if draw(st.booleans()):
        host += "."
    out = []
    for ch in host:
        if ch == ".":
            ch = draw(st.sampled_from(DOTS))
        elif ch.isalnum() and draw(st.integers(0, 3)) == 0:
            ch = chr(ord(ch.upper() if draw(st.booleans()) else ch) + 0xFEE0)  # fullwidth
        if draw(st.integers(0, 5)) == 0:  # percent-encoded, its UTF-8 bytes, either case
            ch = "".join(draw(st.sampled_from([f"%{b:02X}", f"%{b:02x}"])) for b in ch.encode())
        out.append(ch)
    return "".join(out)


@st.composite
def v6_reaching(draw: st.DrawFn, ip: ipaddress.IPv4Address) -> str:
    """An IPv6 literal (in brackets) that reaches the IPv4 `ip`."""
    n = int(ip)
    hi, lo = n >> 16, n & 0xFFFF
    form = draw(st.sampled_from(["mapped-dotted", "mapped-hex", "mapped-long", "6to4", "nat64",
                                 "nat64-dotted", "compatible"]))
    text = {
        "mapped-dotted": f"::ffff:{ip}",
        "mapped-hex": f"::ffff:{hi:x}:{lo:x}",
        "mapped-long": f"0:0:0:0:0:ffff:{hi:04x}:{lo:04x}",
        "6to4": f"2002:{hi:x}:{lo:x}:{draw(st.integers(0, 0xFFFF)):x}::{draw(st.integers(1, 0xFFFF)):x}",
        "nat64": f"64:ff9b::{hi:x}:{lo:x}",
        "nat64-dotted": f"64:ff9b::{ip}",
        "compatible": f"::{ip}",
    }[form]
    return "[" + "".join(c.upper() if draw(st.booleans()) else c for c in text) + "]"


@st.composite
def v6_spelling(draw: st.DrawFn, ip: ipaddress.IPv6Address) -> str:
    text = draw(st.sampled_from([ip.compressed, ip.exploded]))
    return "[" + "".join(c.upper() if draw(st.booleans()) else c for c in text) + "]"


@st.composite
def url_of(draw: st.DrawFn, host: str) -> str:
    """An http(s) URL of `host`, maybe with userinfo, a port and a path."""
    scheme = draw(st.sampled_from(["http", "https", "HTTP", "hTTpS"]))
    userinfo = draw(st.sampled_from(["", "a@", "user:pw@", "a%40b@"]))
    port = draw(st.sampled_from(["", ":80", ":8080", ":9464", ":9901"]))
    return f"{scheme}://{userinfo}{host}{port}/{draw(st.sampled_from(['', 'metrics', 'quitquitquit']))}"


@st.composite
def denied_urls(draw: st.DrawFn) -> tuple[str, IPAddress]:
    """A URL that leads to a denied address, and that address."""
    kind = draw(st.sampled_from(["v4", "v6-reaching-v4", "v6"]))
    if kind == "v4":
        ip: IPAddress = draw(denied_v4)
        host = draw(v4_spelling(ip))
    elif kind == "v6-reaching-v4":
        ip = draw(denied_v4)
        host = draw(v6_reaching(ip))
    else:
        ip = draw(denied_v6)
        host = draw(v6_spelling(ip))
    return draw(url_of(host)), ip


@st.composite
def public_urls(draw: st.DrawFn) -> tuple[str, IPAddress]:
    """A URL whose host is a public address in any spelling, and that address."""
    if draw(st.booleans()):
        ip: IPAddress = draw(public_v4)
        return draw(url_of(draw(v4_spelling(ip)))), ip
    ip = draw(public_v6)
    return draw(url_of(draw(v6_spelling(ip)))), ip
