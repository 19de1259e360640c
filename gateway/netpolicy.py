"""Which addresses the gateway connects to for a partner (RELIABILITY-SECURITY T63).

A partner URL must lead to a public address: a loopback, private, link-local (cloud
metadata at 169.254.169.254 among them), shared, multicast or reserved one is refused, unless
the partner's ``[https] allowed_networks`` lists its network (a partner reached over a VPN,
or the development setup on loopback). A URL's IP literal is checked when the configuration
is loaded; a host name is checked on every connection, on the addresses it resolved to,
and only those addresses are connected to (no second lookup to rebind).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> Network:
    """A network in CIDR form (``10.20.0.0/16``, ``::1/128``); ValueError says why not."""
    return ipaddress.ip_network(text.strip(), strict=True)


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def origin(scheme: str, host: str, port: int) -> str:
    """``scheme://host:port``, an IPv6 literal in brackets (``https://[::1]:8443``)."""
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def refusal(address: str, allowed: Iterable[Network] = ()) -> str | None:
    """Why the gateway may not connect to ``address`` (an IP), or None when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip.version == net.version and ip in net for net in allowed):
        return None
    if ip.is_global and not ip.is_multicast:
        return None
    kind = _kind(ip)
    return f"{ip} is {'an' if kind[0] in 'aeiou' else 'a'} {kind} address"


def _kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_private:
        return "private"
    return "non-public"
