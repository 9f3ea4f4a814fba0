"""Which upstream connections go through an HTTP proxy, read from the usual environment variables.

A Spark on a company network often reaches the cloud only through a proxy.
The gateway reads the variables curl and the Python clients read, once, when
a worker starts:

- ``HTTPS_PROXY`` for https backends, ``HTTP_PROXY`` for http ones, and
  ``ALL_PROXY`` for either when its own is unset; each also in lower case,
  which wins when both are set;
- ``NO_PROXY``: the hosts reached directly, comma-separated: a name covers
  its subdomains too (``example.com``, ``.example.com``), an entry may name a
  port (``host:8080``), an address or range (``10.0.0.0/8``), and ``*``
  covers every host.

A loopback backend (``localhost``, ``127.0.0.0/8``, ``::1``) is always reached
directly: a proxy cannot reach this machine's own loopback, where the Spark's
local model servers listen.

A proxy is an ``http://`` URL, with a port (else 80) and optional credentials,
sent as ``Proxy-Authorization: Basic``. The gateway opens a tunnel through it
(``CONNECT``) for every backend, so TLS to an https backend runs end to end
and the proxy never sees a request or an API key. A proxy URL of any other
kind (``https://``, ``socks5://``) is not used: the worker logs that once at
start, and those backends are reached directly.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import socket
import urllib.parse
from collections.abc import Mapping
from typing import NamedTuple

__all__ = ["Proxies", "Proxy", "authority", "parse_proxy_url"]

log = logging.getLogger(__name__)

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


class Proxy(NamedTuple):
    host: str
    port: int
    # The Proxy-Authorization header's value, when the URL carries credentials.
    authorization: bytes | None = None

    def __repr__(self) -> str:
        # Never the credentials: a repr ends up in logs and tracebacks.
        return f"Proxy({self.host}:{self.port}{', with credentials' if self.authorization else ''})"

    @property
    def address(self) -> str:
        """host:port, for logs (no credentials)."""
        return authority(self.host, self.port)


class Proxies:
    """The proxy for each backend scheme, and the hosts that bypass it."""

    def __init__(self, by_scheme: Mapping[str, Proxy] | None = None, no_proxy: str = "") -> None:
        self.by_scheme = dict(by_scheme or {})
        self.no_proxy = no_proxy
        self._decided: dict[tuple[str, str, int], Proxy | None] = {}

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Proxies:
        env = os.environ if environ is None else environ
        by_scheme: dict[str, Proxy] = {}
        for scheme in ("http", "https"):
            name, url = _first_set(env, f"{scheme}_proxy", "all_proxy")
            if not url:
                continue
            try:
                by_scheme[scheme] = parse_proxy_url(url)
            except ValueError as exc:
                log.warning("%s is not used, so %s backends are reached directly: %s", name, scheme, exc)
        _, no_proxy = _first_set(env, "no_proxy")
        return cls(by_scheme, no_proxy or "")

    def __bool__(self) -> bool:
        return bool(self.by_scheme)

    def for_origin(self, scheme: str, host: str, port: int) -> Proxy | None:
        """The proxy to tunnel through to this origin, or None to connect directly."""
        key = (scheme, host, port)
        if key not in self._decided:
            self._decided[key] = self._decide(scheme, host, port)
        return self._decided[key]

    def _decide(self, scheme: str, host: str, port: int) -> Proxy | None:
        proxy = self.by_scheme.get(scheme)
        if proxy is None or is_loopback(host):
            return None
        if self.no_proxy and _bypassed(host, port, self.no_proxy):
            return None
        return proxy

    def describe(self) -> str:
        """One line for the start-up log: which schemes go through which proxy (no credentials)."""
        parts = [f"{scheme} backends through {proxy.address}" for scheme, proxy in sorted(self.by_scheme.items())]
        if self.no_proxy:
            parts.append(f"NO_PROXY {self.no_proxy}")
        return "; ".join(parts)


def authority(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets: a CONNECT target, or a proxy named in a log."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_proxy_url(url: str) -> Proxy:
    """A proxy from its URL; ``ValueError`` in words that do not repeat the URL (it may hold a password)."""
    if "://" not in url:
        url = "http://" + url  # "proxy:3128", as curl takes it
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "http":
        raise ValueError(f"only http:// proxies are supported, not {parts.scheme}://")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError("its port is not a number from 0 to 65535") from None
    if not parts.hostname:
        raise ValueError("it names no host")
    authorization = None
    if parts.username is not None:
        credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        authorization = b"Basic " + base64.b64encode(credentials.encode("utf-8"))
    return Proxy(parts.hostname, port, authorization)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine: a loopback name or address in any spelling the system connects
    to here, 0.0.0.0 and :: too (copied from a local server's "running on" line, they reach this host)."""
    name = host.strip("[]").lower().rstrip(".")
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(name)
    except ValueError:
        if not name or name.strip("0123456789.") or name.startswith("."):
            return False
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(name))  # the shorthands C's resolver takes: 127.1
        except OSError:
            return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_unspecified


def _bypassed(host: str, port: int, no_proxy: str) -> bool:
    """Whether a ``NO_PROXY`` entry covers the origin: ``*``, the host or a parent domain, an address range."""
    name = host.strip("[]").lower().rstrip(".")
    for entry in no_proxy.lower().split(","):
        entry = entry.strip()
        if entry == "*":
            return True
        entry, entry_port = _split_port(entry)
        if entry_port is not None and entry_port != str(port):
            continue
        # ".example.com" and "*.example.com" (as curl and Go read them) cover what "example.com" covers.
        entry = entry.removeprefix("*").strip(".")
        if not entry:
            continue
        if name == entry or name.endswith("." + entry) or _in_network(name, entry):
            return True
    return False


def _split_port(entry: str) -> tuple[str, str | None]:
    """``host:port`` or ``[v6]:port`` into its parts; a bare IPv6 address or range has no port."""
    if entry.startswith("["):
        close = entry.find("]")
        rest = entry[close + 1 :]
        return entry[1:close], rest[1:] if rest.startswith(":") else None
    if entry.count(":") == 1:
        entry_host, entry_port = entry.split(":")
        return entry_host, entry_port
    return entry, None


def _in_network(name: str, entry: str) -> bool:
    """Whether ``name`` is an address inside ``entry``, a range such as 10.0.0.0/8."""
    if "/" not in entry:
        return False
    try:
        return ipaddress.ip_address(name) in ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False


def _first_set(env: Mapping[str, str], *names: str) -> tuple[str, str]:
    """The first of the names set (lower case before upper case), and its value."""
    for name in names:
        for spelled in (name, name.upper()):
            value = env.get(spelled, "").strip()
            if value:
                return spelled, value
    return "", ""
