"""What a browser may do to a node: the `Host`, `Origin` and `Content-Type` rules, and the security headers.

A page on another origin, loaded in an operator's browser, can send requests to a node on 127.0.0.1 or a
private address: forms and `no-cors` fetches need no CORS consent, and DNS rebinding points a foreign name at
the node. Three checks close that, none of which a business server, an SDK or curl notices:

- `Host` must name the node: its configured and bound HTTP hosts, `localhost` and the loopback addresses,
  the hosts of its `external_*` addresses, or `cluster.allowed_hosts` (any IP address too when the node binds
  a wildcard address: an IP cannot be rebound). Anything else is 421 Misdirected Request.
- An `Origin` header (browsers send one on every cross-origin request and on every POST) must be the node's
  own: the scheme and `Host` the request came with, or one of its hosts on its HTTP port, or be listed in
  `cluster.allowed_origins`; otherwise 403. No `Origin` (curl, business servers, SDKs): allowed.
- A request with a body must say `Content-Type: application/json` (415 otherwise): a form or a `no-cors` fetch
  cannot send that type, and a page that may send it must first pass a CORS preflight, which the node never
  grants.

The WebSocket client port checks `Origin` the same way against every node's HTTP origins (the console's
playground connects from its node's page to any node's WebSocket port) and `cluster.ws_allowed_origins`
(the pages of a web app using WuKongIM's web SDK); native SDKs send none and are let in.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from node.api.fields import HttpError
from node.config import ORIGIN_SCHEMES, Config, NodeSpec, canonical_origin

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
JSON_TYPE = "application/json"


def _hostname(address: str) -> str:
    """The host of `host:port` (IPv6 without brackets), lowercase."""
    host = address.rpartition(":")[0] if ":" in address else address
    return host.strip("[]").lower()


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _url_host(url: str) -> str:
    """The host of an `external_*` value: a ws(s):// URL or host:port."""
    if "://" in url:
        return (urllib.parse.urlsplit(url).hostname or "").lower()
    return _hostname(url)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _netloc(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class Site:
    """scheme, host and port of an origin (`http://host:port`) or of a Host header with a known scheme."""

    scheme: str
    host: str
    port: int

    @staticmethod
    def parse_origin(origin: str) -> Site | None:
        """An `Origin` header's value, or None for anything that is not scheme://host[:port] ("null")."""
        try:
            parts = urllib.parse.urlsplit(origin.strip())
            port = parts.port
        except ValueError:
            return None
        if parts.scheme not in ORIGIN_SCHEMES or not parts.hostname or parts.path or parts.query:
            return None
        return Site(parts.scheme, parts.hostname.lower(), port or ORIGIN_SCHEMES[parts.scheme])

    @staticmethod
    def parse_host(scheme: str, host_header: str) -> Site | None:
        return Site.parse_origin(f"{scheme}://{host_header}")


@dataclass(frozen=True)
class ServedHosts:
    """Host names a node answers to (lowercase, no port); `any_ip`: it binds a wildcard address."""

    names: frozenset[str]
    any_ip: bool

    def serves(self, host: str) -> bool:
        host = host.lower()
        return host in self.names or (self.any_ip and _is_ip(host))


def served_hosts(spec: NodeSpec, bound_http: str, allowed_hosts: Iterable[str]) -> ServedHosts:
    configured = {_hostname(spec.http), _hostname(bound_http)}
    external = {_url_host(v) for v in (spec.external_tcp, spec.external_ws, spec.external_wss) if v}
    names = (configured | external | LOOPBACK_HOSTS | {h.lower() for h in allowed_hosts}) - WILDCARD_HOSTS
    return ServedHosts(frozenset(names), any_ip=bool(configured & WILDCARD_HOSTS))


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class WebGuard:
    """The HTTP API's browser rules and headers, for one node (module docstring).

    `bound_http` gives the HTTP address as bound (the config may say port 0); `ws_sources` the WebSocket
    URLs of the cluster's nodes (`ws://host:port`, a wildcard host left as 0.0.0.0), for the CSP.
    """

    def __init__(
        self, config: Config, node_id: str, bound_http: Callable[[], str], ws_sources: Callable[[], list[str]]
    ) -> None:
        self._config = config
        self._spec = config.node(node_id)
        self._bound_http = bound_http
        self._ws_sources = ws_sources
        self.scheme = "https" if config.tls.http else "http"
        self._allowed_origins = frozenset(config.allowed_origins)

    def hosts(self) -> ServedHosts:
        return served_hosts(self._spec, self._bound_http(), self._config.allowed_hosts)

    def check_host(self, headers: Iterable[tuple[bytes, bytes]]) -> Site | None:
        """The request's own site (scheme and Host), or None without a Host header (HTTP/1.0)."""
        host_header = _header(headers, b"host")
        if host_header is None:
            return None
        site = Site.parse_host(self.scheme, host_header)
        if site is None or not self.hosts().serves(site.host):
            raise HttpError(
                421,
                f"this node does not serve host {host_header!r}: use its address, localhost, or list the "
                "name in cluster.allowed_hosts (a foreign Host is how DNS rebinding reaches a node)",
            )
        return site

    def check_origin(self, headers: Iterable[tuple[bytes, bytes]], own: Site | None) -> None:
        origin = _header(headers, b"origin")
        if origin is None:
            return  # not a browser, or a same-origin GET: nothing a page on another origin can do
        site = Site.parse_origin(origin)
        if site is not None:
            if site == own or canonical_origin(origin) in self._allowed_origins:
                return
            port = _port(self._bound_http())
            if site.scheme == self.scheme and site.port == port and self.hosts().serves(site.host):
                return
        raise HttpError(
            403,
            f"requests from origin {origin!r} are refused: only this node's own pages may call its API "
            "(list other origins in cluster.allowed_origins)",
        )

    @staticmethod
    def check_content_type(headers: Iterable[tuple[bytes, bytes]], has_body: bool) -> None:
        """A body must be declared JSON; a declared type other than JSON is refused even without a body."""
        declared = _header(headers, b"content-type")
        if declared is None and not has_body:
            return
        media_type = (declared or "").split(";", 1)[0].strip().lower()
        if media_type != JSON_TYPE:
            shown = repr(declared) if declared is not None else "none"
            raise HttpError(415, f"this route takes Content-Type: application/json (got {shown})")

    def response_headers(self, own: Site | None) -> list[tuple[bytes, bytes]]:
        """Security headers for every answer: scripts and styles from the node only, connections to the
        node and the cluster's WebSocket ports only, no framing, no sniffing, no referrer."""
        page_host = own.host if own is not None else _hostname(self._bound_http())
        sources = []
        for url in self._ws_sources():
            parts = urllib.parse.urlsplit(url)
            host = (parts.hostname or "").lower()
            if host in WILDCARD_HOSTS:
                host = page_host  # the playground connects to the host its page came from
            try:
                port = f":{parts.port}" if parts.port else ""
            except ValueError:
                continue
            sources.append(f"{parts.scheme}://{_netloc(host)}{port}")
        connect = " ".join(["'self'", *dict.fromkeys(sources)])
        policy = (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
            f"connect-src {connect}; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
        )
        return [
            (b"content-security-policy", policy.encode("latin-1", "replace")),
            (b"x-frame-options", b"DENY"),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
        ]


class WsOriginCheck:
    """Which `Origin` may open a WebSocket client connection (module docstring); None (no header): any."""

    def __init__(self, config: Config, node_id: str, bound_http: Callable[[], str]) -> None:
        self._config = config
        self._node_id = node_id
        self._bound_http = bound_http
        self._scheme = "https" if config.tls.http else "http"
        self._any = "*" in config.ws_allowed_origins
        self._listed = frozenset(config.ws_allowed_origins)

    def allows(self, origin: str | None) -> bool:
        if origin is None or self._any:
            return True
        if canonical_origin(origin) in self._listed:
            return True
        site = Site.parse_origin(origin)
        if site is None or site.scheme != self._scheme:
            return False
        for node_id, spec in self._config.nodes.items():
            bound = self._bound_http() if node_id == self._node_id else spec.http
            hosts = served_hosts(spec, bound, self._config.allowed_hosts)
            if site.port == _port(bound) and hosts.serves(site.host):
                return True
        return False
