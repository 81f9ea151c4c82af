"""The egress check, pure (domain/egress.py; issue 16 items 1 and 7): how a URL's host is read
(IDNA/UTS-46, every IPv4 spelling, IPv6 forms that reach IPv4), which addresses are denied, what
CONVEYOR_HTTP_ALLOW allows, and which URLs are malformed. Generated spellings of denied addresses
(tests/spellings.py) must all be read as the address they are, and refused."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.domain.egress import (
    BadUrl,
    EgressDenied,
    EgressPolicy,
    denial,
    destination,
    reached_ipv4,
    url_problem,
)
from tests.spellings import IPAddress, denied_urls, denied_v4, denied_v6, public_urls, public_v4

DEFAULT = EgressPolicy.parse(())
COMPATIBLE = ipaddress.IPv6Network("::/96")


def _leads_to(address: IPAddress | None, ip: IPAddress) -> bool:
    """Whether the parsed `address` is `ip`, or an IPv6 form that reaches it."""
    if address == ip:
        return True
    return address is not None and (reached_ipv4(address) == ip
                                     or (address in COMPATIBLE and int(address) == int(ip)))


@settings(max_examples=600, deadline=None)
@given(denied_urls())
def test_every_spelling_of_a_denied_address_is_read_as_that_address_and_refused(
        drawn: tuple[str, IPAddress]) -> None:
    url, ip = drawn
    target = destination(url, 2048)
    assert _leads_to(target.address, ip), (url, target)
    assert denial(target.address) is not None  # type: ignore[arg-type]
    with pytest.raises(EgressDenied, match=r"^EGRESS_DENIED: "):
        DEFAULT.check(target.host, target.port, [str(target.address)])
    # The URL handed to the client names the address in its one canonical spelling.
    assert destination(target.url, 2048) == target


@settings(max_examples=300, deadline=None)
@given(st.one_of(denied_v4, denied_v6), st.lists(public_v4, max_size=2), st.integers(1, 65535))
def test_a_name_is_refused_when_any_address_it_resolves_to_is_denied(
        ip: IPAddress, public: list[ipaddress.IPv4Address], port: int) -> None:
    addresses = [str(a) for a in public] + [str(ip)]
    with pytest.raises(EgressDenied, match=rf"^EGRESS_DENIED: api\.test resolves to {ip}, "):
        DEFAULT.check("api.test", port, addresses)


@settings(max_examples=300, deadline=None)
@given(public_urls())
def test_public_addresses_in_any_spelling_pass(drawn: tuple[str, IPAddress]) -> None:
    url, ip = drawn
    target = destination(url, 2048)
    assert target.address == ip
    DEFAULT.check(target.host, target.port, [str(target.address)])


@pytest.mark.parametrize(("url", "address", "why"), [
    ("http://127\u30020\u30020\u30021/", "127.0.0.1", "loopback (127.0.0.0/8)"),
    ("http://\uff11\uff12\uff17.\uff10.\uff10.\uff11:9464/metrics", "127.0.0.1", "loopback (127.0.0.0/8)"),
    ("http://169\u3002254\uff0e169\uff61254/latest/meta-data/", "169.254.169.254",
     "link-local, cloud metadata (169.254.0.0/16)"),
    ("http://2130706433/", "127.0.0.1", "loopback (127.0.0.0/8)"),
    ("http://0x7f.1/", "127.0.0.1", "loopback (127.0.0.0/8)"),
    ("http://0177.0.0.1/", "127.0.0.1", "loopback (127.0.0.0/8)"),
    ("http://127.1/", "127.0.0.1", "loopback (127.0.0.0/8)"),
    ("http://0/", "0.0.0.0", "'this network' (0.0.0.0/8)"),
    ("http://[::ffff:127.0.0.1]/", "::ffff:7f00:1", "loopback (127.0.0.0/8), reached as 127.0.0.1"),
    ("http://[2002:7f00:1::]/", "2002:7f00:1::", "loopback (127.0.0.0/8), reached as 127.0.0.1"),
    ("http://[64:ff9b::a9fe:a9fe]/", "64:ff9b::a9fe:a9fe",
     "link-local, cloud metadata (169.254.0.0/16), reached as 169.254.169.254"),
    ("http://[::127.0.0.1]/", "::7f00:1", "IPv4-compatible (::/96)"),
    ("http://[::]/", "::", "unspecified (::)"),
    ("http://a@127.0.0.1/", "127.0.0.1", "loopback (127.0.0.0/8)"),
    ("http://%31%32%37.0.0.1/", "127.0.0.1", "loopback (127.0.0.0/8)"),
    ("http://100.64.0.1/", "100.64.0.1", "shared, CGNAT (100.64.0.0/10)"),
    ("http://[fd00:ec2::254]/", "fd00:ec2::254", "unique local, ULA (fc00::/7)"),
    ("http://[fe80::1]/", "fe80::1", "link-local (fe80::/10)"),
    ("http://224.0.0.1/", "224.0.0.1", "multicast (224.0.0.0/4)"),
    ("http://255.255.255.255/", "255.255.255.255", "reserved, broadcast (240.0.0.0/4)"),
])
def test_the_spellings_of_the_issue_are_read_as_the_address_and_refused(url: str, address: str,
                                                                        why: str) -> None:
    target = destination(url, 2048)
    assert str(target.address) == target.host == address
    assert denial(target.address) == why  # type: ignore[arg-type]
    with pytest.raises(EgressDenied) as refused:
        DEFAULT.check(target.host, target.port, [address])
    assert str(refused.value) == f"EGRESS_DENIED: {address} is {why}, not allowed by CONVEYOR_HTTP_ALLOW"


@pytest.mark.parametrize(("url", "canonical", "port"), [
    ("HTTP://Example.COM./a?b#c", "http://example.com/a?b", 80),
    ("https://B\u00fccher.example:8443/x", "https://xn--bcher-kva.example:8443/x", 8443),
    ("http://\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25\u3002com/", "http://example.com/", 80),
    ("http://my_service:9000/", "http://my_service:9000/", 9000),
    ("http://u:p@[2606:2800:0220:0001:0248:1893:25C8:1946]:80/", "http://u:p@[2606:2800:220:1:248:1893:25c8:1946]/",
     80),
    ("https://8.8.8.8:443", "https://8.8.8.8", 443),
])
def test_hosts_are_read_as_browsers_and_the_client_read_them(url: str, canonical: str, port: int) -> None:
    target = destination(url, 2048)
    assert (target.url, target.port) == (canonical, port)


@pytest.mark.parametrize(("url", "problem"), [
    ("http://[::1", "is not a valid URL"),
    ("http://[::1]x/", "is not a valid URL: text after the IPv6 address"),
    ("http://", "must be an absolute http or https URL"),
    ("http:///path", "must be an absolute http or https URL"),
    ("ftp://x", "must be an absolute http or https URL"),
    ("javascript:alert(1)", "must be an absolute http or https URL"),
    ("//example.com/", "must be an absolute http or https URL"),
    ("http://a b", "must not contain spaces or control characters"),
    ("http://exa\x00mple.com/", "must not contain spaces or control characters"),
    ("http://example.com/\n", "must not contain spaces or control characters"),
    ("http://example.com/" + "a" * 2048, "is 2067 characters; at most 2048 are allowed"),
    ("http://:80/", "must name a host"),
    ("http://a@/", "must name a host"),
    ("http://[::1]:99999/", "has an invalid port (1-65535)"),
    ("http://x:0/", "has an invalid port (1-65535)"),
    ("http://x:8o/", "has an invalid port (1-65535)"),
    ("http://x:\uff18\uff10/", "has an invalid port (1-65535)"),
    ("http://::1/", "is not a valid URL: an IPv6 address must be in brackets"),
    ("http://[fe80::1%25eth0]/", "must not name an IPv6 zone"),
    ("http://[127.0.0.1]/", "is not a valid URL"),
    ("http://[1:2:3]/", "is not a valid URL"),
    ("http://[v1.x]/", "has an invalid IPv6 address"),
    ("http://1.2.3.256/", "has an invalid IPv4 address"),
    ("http://1.2.3.4.5/", "has an invalid IPv4 address"),
    ("http://0x1g.1/", "has an invalid IPv4 address"),
    ("http://089.0.0.1/", "has an invalid IPv4 address"),
    ("http://example.0x/", "has an invalid IPv4 address"),
    ("http://a..b/", "has an invalid host name"),
    ("http://-a.example/", "has an invalid host name"),
    ("http://a%2Fb/", "has an invalid host name"),
    ("http://%ff/", "has an invalid host name"),
    ("http://\u3000x/", "has an invalid host name"),
    ("http://" + "a." * 127 + "b/", "has a host name over 253 characters"),
])
def test_malformed_urls_are_named(url: str, problem: str) -> None:
    assert url_problem(url, 2048) == problem
    with pytest.raises(BadUrl):
        destination(url, 2048)


def test_the_allow_list_allows_what_it_names_and_no_more() -> None:
    policy = EgressPolicy.parse(["127.0.0.1:9000", " 10.0.0.0/8 ", "localhost", "*.corp.example:8443", "::1",
                                 "0x7f.2", "\uff11\uff12\uff17.0.0.3:80"])
    allowed = [("127.0.0.1", 9000, "127.0.0.1"), ("x.test", 1, "10.200.0.1"),
               ("x.test", 1, "::ffff:10.1.2.3"),  # the IPv4 it reaches is allowed
               ("localhost", 80, "127.0.0.1"), ("localhost", 80, "::1"),  # by name, any address
               ("api.corp.example", 8443, "192.168.1.1"), ("::1", 5, "::1"),
               ("127.0.0.2", 1, "127.0.0.2"), ("127.0.0.3", 80, "127.0.0.3")]
    for host, port, address in allowed:
        policy.check(host, port, [address])
    refused = [("127.0.0.1", 9001, "127.0.0.1"),  # another port
               ("x.test", 1, "192.168.0.1"),  # outside the network
               ("corp.example", 8443, "192.168.1.1"),  # *. is for subdomains only
               ("api.corp.example", 443, "192.168.1.1"),  # another port
               ("other", 80, "127.0.0.1"),  # the name allowed is localhost, not its address
               ("x.test", 1, "169.254.169.254"), ("127.0.0.3", 81, "127.0.0.3")]
    for host, port, address in refused:
        with pytest.raises(EgressDenied):
            policy.check(host, port, [address])
    # Every address must pass: one allowed does not carry a denied one.
    with pytest.raises(EgressDenied):
        policy.check("x.test", 1, ["10.0.0.1", "172.16.0.1"])


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "a b", "127.0.0.1:0", "x:99999", "*.1.2.3.4", "[::1",
                                   "http://x/", "*."])
def test_a_malformed_allow_entry_is_named(entry: str) -> None:
    with pytest.raises(ValueError) as refused:
        EgressPolicy.parse(["127.0.0.1", entry])
    assert str(refused.value) == f"CONVEYOR_HTTP_ALLOW: {entry!r} is not a host, host:port, or network"
