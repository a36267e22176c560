"""**Public addresses only** (unless ``Settings.webhook_allow_private``): a merchant's URL is
fetched from inside our network, so one naming 127.0.0.1, 10.0.0.0/8 or the cloud metadata
address 169.254.169.254 would turn the worker into a proxy onto internal services (SSRF). A
URL whose host is such an address, or ``localhost``, is refused when it is registered (400).
A host name is resolved before every attempt; if any of its addresses is not public the attempt
fails without a byte sent, and otherwise the request goes to the checked address itself (with
the original ``Host`` header and TLS server name), so a name that resolves differently a moment
later (DNS rebinding) cannot redirect it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from oncepay.payments.errors import InvalidRequest

__all__ = ["NotPublic", "is_public", "pinned", "public_target", "resolve", "validate_url"]

MAX_URL = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public(address: IPAddress) -> bool:
    """Whether webhooks may be sent to ``address``: a global unicast address, not loopback,
    private (RFC 1918, fc00::/7), link-local (169.254/16: cloud metadata), shared (100.64/10),
    multicast, reserved or unspecified. IPv4 inside IPv6 (``::ffff:10.0.0.1``) counts as the
    IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour
        if inner is not None:
            address = inner
    return address.is_global and not (
        address.is_multicast or address.is_reserved or address.is_unspecified
    )


def literal(host: str) -> IPAddress | None:
    """The address ``host`` names literally, if it is one: also the legacy IPv4 forms that
    resolvers accept (``127.1``, ``0x7f.1``, ``2130706433``), a classic way round a check that
    knows only the dotted quad."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def validate_url(url: str, *, allow_private: bool = False) -> str:
    """http(s), a host, no credentials, a public address (unless ``allow_private``): anything
    else is a clear 400."""
    if len(url) > MAX_URL:
        raise InvalidRequest(f"url: at most {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number or out of range
    except ValueError as exc:
        raise InvalidRequest(f"url: {exc}") from None
    if parts.scheme not in {"http", "https"}:
        raise InvalidRequest("url: only http and https URLs can receive webhooks")
    if not parts.hostname:
        raise InvalidRequest("url: a host is required")
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest("url: must not contain credentials; authenticate by signature")
    if not url.isascii() or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidRequest(
            "url: must be ASCII without whitespace or control characters "
            "(write an international host in its xn-- form)"
        )
    if unsafe := sorted({c for c in url if c in _UNSAFE}):
        raise InvalidRequest(
            f"url: {' '.join(unsafe)} must be percent-encoded (RFC 3986 does not allow them)"
        )
    if port == 0:
        raise InvalidRequest("url: port 0 is no port")
    if not _host_name(parts.hostname):
        raise InvalidRequest(
            f"url: {parts.hostname!r} is not a host name (labels of letters, digits and "
            "hyphens, at most 63 characters each and 253 in all) nor an IP address"
        )
    try:
        httpx.URL(url).host.encode("idna")  # what the sender will do with it, refused now
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise InvalidRequest(f"url: {exc}") from None
    if not allow_private:
        host = parts.hostname.rstrip(".").lower()
        address = literal(host)
        if (
            host == "localhost"
            or host.endswith(".localhost")
            or (address is not None and not is_public(address))
        ):
            raise InvalidRequest(
                f"url: {parts.hostname} is not a public address; webhooks go to public "
                "addresses only (a development server can set ONCEPAY_WEBHOOK_ALLOW_PRIVATE)"
            )
    del port
    return url


# Characters RFC 3986 allows nowhere in a URL unencoded (a stored URL is shown and sent as is).
_UNSAFE = frozenset('"<>\\^`{|}')
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def _host_name(host: str) -> bool:
    """Whether ``host`` (as urlsplit gives it: lower case, an IPv6 literal without brackets)
    is an IP address or a host name by RFC 1123: a percent-encoded host (``%31%32%37.0.0.1``),
    an underscore or a label that starts or ends with a hyphen is neither."""
    if ":" in host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


class Resolver(Protocol):
    async def __call__(self, host: str, port: int) -> list[str]: ...


class NotPublic(Exception):
    """The URL's host resolves to an address webhooks must not be sent to."""


async def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, by the system's resolver."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def public_target(
    url: str, resolver: Resolver = resolve
) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
    """Where to send a delivery to ``url``: its URL with the host replaced by a checked public
    address, the ``Host`` header to send, and the TLS server name (the request extensions).
    Raises :class:`NotPublic` when any address of the host is not public."""
    target = httpx.URL(url)
    host = target.host
    address = literal(host)
    if address is not None:
        addresses = [str(address)]
    else:
        port = target.port or (443 if target.scheme == "https" else 80)
        addresses = await resolver(host, port)
        if not addresses:
            raise NotPublic(f"{host} resolves to no address")
    bad = [a for a in addresses if (parsed := literal(a)) is None or not is_public(parsed)]
    if bad:
        raise NotPublic(f"{host} resolves to {', '.join(bad)}, not a public address")
    return pinned(target, addresses[0])


def pinned(target: httpx.URL, address: str) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
    """``target`` sent to ``address``: the URL with that host, the ``Host`` header of the
    original, and for https the original name as TLS server name, which the certificate is
    verified against."""
    host = target.host
    netloc = host if target.port is None else f"{host}:{target.port}"
    extensions = {"sni_hostname": host} if target.scheme == "https" else {}
    return target.copy_with(host=address), {"host": netloc}, extensions
