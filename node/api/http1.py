"""HTTP/1.1 only on the API port, plain and TLS alike: what business servers and the console use.

Hypercorn switches a connection to HTTP/2 on its own, with no setting to stop it: on `Upgrade: h2c` (after a
101 answer) and on the prior-knowledge preface `PRI * HTTP/2.0`, on the plain listener and, after ALPN chose
http/1.1, on the TLS one too. HTTP/2 would expose a second parser and its own limits for no gain, so the one
method that decides the switch is replaced for the node's process: an `Upgrade: h2c` is ignored (RFC 9110
section 7.8 lets a server ignore Upgrade) and the request is answered in HTTP/1.1, and the preface reaches
the app as an "HTTP/2.0" request, which it answers 505 in HTTP/1.1 (`HttpApi`).
"""

from __future__ import annotations

from typing import Any

from hypercorn.protocol import h11 as hypercorn_h11

SUPPORTED_VERSIONS = frozenset({"1.0", "1.1"})


async def _stay_on_http11(self: Any, event: Any) -> None:
    """Never raise hypercorn's H2CProtocolRequiredError or H2ProtocolAssumedError: no switch to HTTP/2."""


def http11_only() -> None:
    """Stop Hypercorn's HTTP/2 switch in this process (idempotent). A Hypercorn without the method this
    replaces fails here, at start, rather than serving HTTP/2 again unnoticed."""
    if not hasattr(hypercorn_h11.H11Protocol, "_check_protocol"):
        raise RuntimeError("hypercorn changed: H11Protocol._check_protocol is gone (node/api/http1.py)")
    setattr(hypercorn_h11.H11Protocol, "_check_protocol", _stay_on_http11)  # noqa: B010
