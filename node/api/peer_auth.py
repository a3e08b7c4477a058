"""Node-to-node HTTP calls, authenticated both ways with the cluster secret (never the manager token).

A calling node signs its request: HMAC-SHA256, under a key derived from the cluster secret, over the method,
the path with its query, the calling node's id, the time and a digest of the body. The answering node checks
that signature (and that the time is within `MAX_SKEW_S` of its own clock) instead of the manager token, and
signs its answer over the request's signature, the status and a digest of the answer's body, so the caller
knows the answer comes from a holder of the secret too: a stranger that took over a stopped peer's port
learns no token, and its made-up answer is refused.

The token is still what business servers and operators use; the secret never leaves the cluster's machines.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

# Request headers (lowercase: ASGI gives them so) and the answer's.
NODE_HEADER = "x-imnode-node"
TIME_HEADER = "x-imnode-time"
SIGNATURE_HEADER = "x-imnode-signature"
ANSWER_SIGNATURE_HEADER = "x-imnode-answer-signature"
# Clocks of a cluster's machines agree far better than this; a captured request is useless after it.
MAX_SKEW_S = 30.0
_KEY_LABEL = b"imnode node-to-node http v1"


def derive_key(secret: str) -> bytes:
    """The signing key: bound to this use, so a signature is no use anywhere else the secret is."""
    return hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()


def _mac(key: bytes, *parts: bytes) -> str:
    return hmac.new(key, b"\n".join(parts), hashlib.sha256).hexdigest()


def _request_mac(key: bytes, method: str, target: str, node: str, to: str, when: str, body: bytes) -> str:
    digest = hashlib.sha256(body).hexdigest().encode()
    parts = (method, target, node, to, when)
    return _mac(key, b"request", *(part.encode() for part in parts), digest)


def sign_request(key: bytes, method: str, target: str, node: str, to: str, body: bytes) -> dict[str, str]:
    """Headers that authenticate a request for `target` (path plus "?query" if any) from node `node` to
    node `to` (so a captured request is no good at any other member)."""
    when = str(int(time.time()))
    signature = _request_mac(key, method, target, node, to, when, body)
    return {NODE_HEADER: node, TIME_HEADER: when, SIGNATURE_HEADER: signature}


def verify_request(
    key: bytes,
    method: str,
    target: str,
    to: str,
    headers: Mapping[str, str],
    body: bytes,
    now: float | None = None,
) -> str | None:
    """The signature if the request is signed with the cluster's key for node `to` within the allowed
    skew, else None."""
    node, when, given = (headers.get(h, "") for h in (NODE_HEADER, TIME_HEADER, SIGNATURE_HEADER))
    if not (node and when.isascii() and when.isdigit() and given):
        return None
    if abs((time.time() if now is None else now) - int(when)) > MAX_SKEW_S:
        return None
    expected = _request_mac(key, method, target, node, to, when, body)
    return given if hmac.compare_digest(expected.encode(), given.encode()) else None


def sign_answer(key: bytes, request_signature: str, status: int, body: bytes) -> str:
    digest = hashlib.sha256(body).hexdigest().encode()
    return _mac(key, b"answer", request_signature.encode(), str(status).encode(), digest)


def verify_answer(key: bytes, request_signature: str, status: int, body: bytes, given: str) -> bool:
    return hmac.compare_digest(sign_answer(key, request_signature, status, body).encode(), given.encode())
