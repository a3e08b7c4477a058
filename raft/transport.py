"""imnode's Raft transport under PySyncObj: an authenticated handshake, then bounded AES-GCM frames of CBOR.

PySyncObj's own transport unpickles every message it decrypts with a key derived from the password and a
fixed salt, and buffers a length prefix of up to 2^31 - 1 bytes before it checks anything: whoever knows
(or guesses) the password runs code on the node, and anyone who can reach the port can make it copy
gigabytes. This module replaces the connection layer only; PySyncObj's Raft logic, journal and membership
run as they are (`SyncObj(..., transportClass=...)`).

A connection, as the dialling node (the initiator, I) and the accepting node (the responder, R) see it:

    I -> R  HELLO      MAGIC | nonce_i (32 random bytes)
    R -> I  CHALLENGE  MAGIC | nonce_r (32 random bytes) | HMAC(auth_key, "R" | nonce_i | nonce_r)
    I -> R  PROOF      HMAC(auth_key, "I" | nonce_i | nonce_r | addr) | len(addr) (1 byte) | addr
    frames  both ways  length (4 bytes, big-endian) | AES-256-GCM(this direction's key, counter nonce, cbor2)

- `auth_key` and the two session keys come from HKDF-SHA256 over the cluster secret; the session keys also
  over both nonces, so every connection has keys of its own and each direction its own key.
- Both sides prove the secret over the other's fresh nonce: a recorded handshake cannot be replayed. `addr`
  is the initiator's Raft address (PySyncObj needs it to know which node an incoming connection is); it is
  inside the initiator's proof, so nobody can claim to be another node without the secret.
- Nothing but the handshake is read before it succeeds: each handshake message has a fixed size (PROOF at
  most 288 bytes), the read asks the socket for no more than the message still lacks, and an unfinished
  handshake is closed after `handshake_timeout_s`. At most `MAX_PENDING_HANDSHAKES` incoming connections
  may be in their handshake at once; more are closed as they arrive.
- Each frame's nonce is a counter per direction that both sides keep: a frame replayed, reordered, dropped
  or altered fails authentication, and the connection is closed (PySyncObj reconnects and resends).
- A length prefix above `frame_cap` (see `frame_cap_bytes`) is refused, and the connection closed, as soon
  as its 4 bytes are read: nothing of its body is buffered.
- Messages are CBOR (dicts of str, int, bool, bytes, lists); PySyncObj expects tuples for log entries and
  snapshot chunks, and gets them back (`_restore`). Nothing from the network is ever unpickled here. The
  commands inside entries are PySyncObj's own pickles, which it unpickles when it applies or scans them;
  `check_command` lets through only the shapes PySyncObj itself writes (no callable but pysyncobj's
  `TCPNode` in a membership change), so not even a peer that holds the secret runs code through a command.
  PySyncObj's chunked path for a single entry above `appendEntriesBatchSizeBytes` (a pickle of the entry in
  pieces) is refused: imnode's proposer keeps every entry below that size.

There is no rolling change from PySyncObj's transport: every node of a cluster must run this one.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import hmac
import io
import logging
import os
import pickle
import struct
from collections.abc import Callable
from typing import Any

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pysyncobj.monotonic import monotonic as monotonic_time
from pysyncobj.node import TCPNode
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.transport import TCPTransport

log = logging.getLogger("imnode.raft.transport")

MAGIC = b"IMRAFT01"
NONCE_BYTES = 32
PROOF_BYTES = 32
MAX_ADDR_BYTES = 255
HELLO_BYTES = len(MAGIC) + NONCE_BYTES
CHALLENGE_BYTES = len(MAGIC) + NONCE_BYTES + PROOF_BYTES
PROOF_HEAD_BYTES = PROOF_BYTES + 1  # the proof, then the length of the address that follows
MAX_PENDING_HANDSHAKES = 16
TAG_BYTES = 16  # AES-GCM's tag: the smallest possible frame body
FRAME_MARGIN_BYTES = 64 << 10  # message keys, entry indexes and terms, CBOR headers, the tag
_LENGTH = struct.Struct(">I")
_COUNTER_NONCE = struct.Struct(">4xQ")  # 12-byte GCM nonce: 4 zero bytes, then the frame counter

# PySyncObj's command types (the first byte of a command), pysyncobj/syncobj.py `_COMMAND_TYPE`.
_REGULAR, _NO_OP, _MEMBERSHIP, _VERSION = range(4)
# The only callable a command's pickle may name: the node of a membership change.
_MEMBERSHIP_GLOBAL = ("pysyncobj.node", "TCPNode")

# What each PySyncObj message type may carry; anything else is refused. (pysyncobj/syncobj.py sends these.)
# imnode's own messages between members (raft/safe_syncobj.py hands them to the node, never to PySyncObj):
# {"type": MEMBER_MESSAGE, "body": any CBOR}.
MEMBER_MESSAGE = "imnode"
MESSAGE_TYPES = frozenset(
    {
        "append_entries",
        "next_node_idx",
        "request_vote",
        "response_vote",
        "apply_command",
        "apply_command_response",
        "timeout_now",
        MEMBER_MESSAGE,
    }
)


class Refused(Exception):
    """A peer's bytes that this transport does not accept; the connection is closed."""


def frame_cap_bytes(append_entries_batch_bytes: int, snapshot_chunk_bytes: int) -> int:
    """The largest frame a node accepts: what its largest legitimate message needs.

    - AppendEntries: PySyncObj gathers entries until their commands reach `appendEntriesBatchSizeBytes`,
      so a batch holds less than that plus one more entry, itself below that size (the proposer's limit):
      under twice the batch size.
    - A snapshot travels as AppendEntries messages of one chunk each, of `logCompactionBatchSize` bytes
      (pysyncobj/serializer.py `getTransmissionData`): far below that.
    - Everything else (votes, replies, a forwarded command below the batch size) is smaller still.
    A message that would encode above the cap (many tiny entries: CBOR adds ~20 bytes per entry) is split
    by the sender into several AppendEntries (`_split_append_entries`), so the cap never stalls a follower.
    """
    return 2 * append_entries_batch_bytes + snapshot_chunk_bytes + FRAME_MARGIN_BYTES


# -- keys ----------------------------------------------------------------------------------------------
def _hkdf(secret: bytes, length: int, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def auth_key(secret: bytes) -> bytes:
    """The key both sides prove the secret with (never used to encrypt)."""
    return _hkdf(secret, 32, None, b"imnode raft v1 handshake")


def session_keys(secret: bytes, nonce_i: bytes, nonce_r: bytes) -> tuple[bytes, bytes]:
    """(initiator -> responder key, responder -> initiator key) of one connection."""
    keys = _hkdf(secret, 64, nonce_i + nonce_r, b"imnode raft v1 session")
    return keys[:32], keys[32:]


def handshake_proof(key: bytes, label: bytes, nonce_i: bytes, nonce_r: bytes, addr: bytes = b"") -> bytes:
    return hmac.new(key, label + nonce_i + nonce_r + addr, hashlib.sha256).digest()


# -- frames --------------------------------------------------------------------------------------------
class FrameSealer:
    """One direction's sender: CBOR, then AES-GCM under a counter nonce, then the length prefix."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._counter = 0

    def seal(self, message: Any) -> bytes:
        return self.seal_encoded(cbor2.dumps(message))

    def seal_encoded(self, plain: bytes) -> bytes:
        nonce = _COUNTER_NONCE.pack(self._counter)
        self._counter += 1
        body = self._aead.encrypt(nonce, plain, None)
        return _LENGTH.pack(len(body)) + body


class FrameOpener:
    """One direction's receiver: expects the next counter; anything else fails authentication."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._counter = 0

    def open(self, body: bytes) -> dict[str, Any]:
        try:
            plain = self._aead.decrypt(_COUNTER_NONCE.pack(self._counter), body, None)
        except InvalidTag:
            raise Refused("a frame failed authentication (tampered, replayed or reordered)") from None
        self._counter += 1
        try:
            message = cbor2.loads(plain)
        except Exception as exc:  # authenticated, so a peer's bug: refuse it all the same
            raise Refused(f"an authenticated frame is not CBOR: {exc!r}") from None
        return _restore(message)


def _restore(message: Any) -> dict[str, Any]:
    """Check a decoded message's shape and give back the tuples PySyncObj expects."""
    if not isinstance(message, dict) or message.get("type") not in MESSAGE_TYPES:
        raise Refused("not a Raft message")
    if "transmission" in message:
        # PySyncObj would unpickle the reassembled pieces; imnode never sends an entry that large.
        raise Refused("chunked AppendEntries are not accepted")
    entries = message.get("entries")
    if entries is not None:
        if not isinstance(entries, list):
            raise Refused("entries is not a list")
        restored = []
        for entry in entries:
            if (
                not isinstance(entry, list)
                or len(entry) != 3
                or not isinstance(entry[0], bytes)
                or type(entry[1]) is not int
                or type(entry[2]) is not int
            ):
                raise Refused("an entry is not (command, index, term)")
            check_command(entry[0])
            restored.append((entry[0], entry[1], entry[2]))
        message["entries"] = restored
    serialized = message.get("serialized")
    if serialized is not None:
        if (
            not isinstance(serialized, list)
            or len(serialized) != 3
            or not isinstance(serialized[0], bytes)
            or not isinstance(serialized[1], bool)
            or not isinstance(serialized[2], bool)
        ):
            raise Refused("a snapshot chunk is not (data, first, last)")
        message["serialized"] = (serialized[0], serialized[1], serialized[2])
    if "command" in message:
        if not isinstance(message["command"], bytes):
            raise Refused("a forwarded command is not bytes")
        check_command(message["command"])
    return message


class _OnlyTCPNode(pickle.Unpickler):
    """Loads a pickle with no global but PySyncObj's TCPNode (and only where `allowed`): every GLOBAL and
    STACK_GLOBAL goes through `find_class`, so no trick with the stack reaches anything else."""

    def __init__(self, data: bytes, allowed: bool) -> None:
        super().__init__(io.BytesIO(data))
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if self._allowed and (module, name) == _MEMBERSHIP_GLOBAL:
            return TCPNode
        raise Refused(f"a command's pickle names {module}.{name}")


def check_command(command: bytes) -> None:
    """Refuse a command PySyncObj would unpickle into a call: only the shapes it writes itself pass.

    The command is loaded here with an unpickler that knows no global but TCPNode: a regular command is
    `pickle((method id, args, kwargs))` and a version one an int, neither naming any global; a membership
    change pickles `['add'|'rem', node id, TCPNode]`, whose node must hold plain values only.
    """
    if not command:
        raise Refused("an empty command")
    kind = command[0]
    if kind == _NO_OP:
        return
    if kind not in (_REGULAR, _MEMBERSHIP, _VERSION):
        raise Refused(f"unknown command type {kind}")
    try:
        value = _OnlyTCPNode(command[1:], allowed=kind == _MEMBERSHIP).load()
    except Refused:
        raise
    except Exception as exc:
        raise Refused(f"a command is not a pickle PySyncObj writes: {exc!r}") from None
    if kind == _MEMBERSHIP and not (
        isinstance(value, list)
        and len(value) == 3
        and value[0] in ("add", "rem")
        and isinstance(value[1], str)
        and type(value[2]) is TCPNode
        and all(isinstance(v, (str, int, type(None))) for v in vars(value[2]).values())
    ):
        raise Refused("a membership command is not ['add'|'rem', node id, TCPNode]")


def _split_append_entries(message: dict[str, Any]) -> list[dict[str, Any]]:
    """An AppendEntries as two valid halves (the second continues from the first's last entry)."""
    entries = message["entries"]
    half = len(entries) // 2
    first = {**message, "entries": entries[:half]}
    last_idx, last_term = entries[half - 1][1], entries[half - 1][2]
    second = {**message, "entries": entries[half:], "prevLogIdx": last_idx, "prevLogTerm": last_term}
    return [first, second]


# -- the connection ------------------------------------------------------------------------------------
_CONNECTING, _AWAIT_HELLO, _AWAIT_CHALLENGE, _AWAIT_PROOF, _OPEN, _CLOSED = range(6)


class SecureConnection(TcpConnection):
    """PySyncObj's TcpConnection with this module's handshake and frames.

    It reuses the base class's socket, poller and write path and overrides, by their name-mangled names, the
    two steps that touch received bytes: one read (`__processRead`) and one parse (`__processParseMessage`).
    """

    def _adopt(
        self,
        *,
        secret: bytes,
        key: bytes,
        frame_cap: int,
        handshake_timeout_s: float,
        on_authenticated: Callable[[str], None],
    ) -> None:
        self._secret = secret
        self._auth_key = key
        self._frame_cap = frame_cap
        self._handshake_timeout_s = handshake_timeout_s
        self._on_authenticated = on_authenticated
        self.refused: str | None = None  # why this side last closed the connection, for logs and tests
        self._reset(_CONNECTING)

    def _reset(self, phase: int) -> None:
        self._phase = phase
        self._rbuf = bytearray()
        self._rpos = 0  # where the next frame to parse starts in _rbuf
        self._scan = 0  # where the next frame whose length is not yet checked starts
        self._deadline = monotonic_time() + self._handshake_timeout_s
        self._nonce_i = b""
        self._nonce_r = b""
        self._sealer: FrameSealer | None = None
        self._opener: FrameOpener | None = None
        self._self_addr = b""

    @property
    def authenticated(self) -> bool:
        return self._phase == _OPEN

    # -- roles -------------------------------------------------------------------------------------------
    def start_responder(self) -> None:
        self._reset(_AWAIT_HELLO)

    def start_initiator(self, self_addr: str) -> None:
        self._reset(_AWAIT_CHALLENGE)
        self._self_addr = self_addr.encode()
        self._nonce_i = os.urandom(NONCE_BYTES)
        self._send_raw(MAGIC + self._nonce_i)

    def expire_handshake(self, now: float) -> None:
        """Close a handshake that outlived its time (called from the transport's tick)."""
        if self._phase in (_AWAIT_HELLO, _AWAIT_CHALLENGE, _AWAIT_PROOF) and now > self._deadline:
            self._refuse("the handshake did not finish in time")

    def _refuse(self, reason: str) -> None:
        log.warning("raft connection closed: %s", reason)
        self.refused = reason
        self.disconnect()

    # -- PySyncObj's interface ---------------------------------------------------------------------------
    def connect(self, host: str, port: int) -> bool:
        self._reset(_CONNECTING)
        return bool(super().connect(host, port))

    def disconnect(self) -> None:
        # Reset first: the base class calls the transport back, which may reconnect at once.
        self._reset(_CLOSED)
        super().disconnect()

    def send(self, message: Any) -> None:
        sealer = self._sealer
        if sealer is None:
            return  # not authenticated: the transport reports the node as not connected
        plain = cbor2.dumps(message)
        if len(plain) + TAG_BYTES > self._frame_cap:
            if message.get("type") == "append_entries" and len(message.get("entries") or ()) > 1:
                for part in _split_append_entries(message):
                    self.send(part)
                return
            log.error("a Raft message of %d bytes exceeds the frame cap of %d", len(plain), self._frame_cap)
            self._refuse("a message to send exceeds the frame cap")
            return
        self._send_raw(sealer.seal_encoded(plain))

    def _send_raw(self, data: bytes) -> None:
        self._TcpConnection__writeBuffer += data
        self._TcpConnection__trySendBuffer()

    # -- reading (overrides of PySyncObj's name-mangled steps) -------------------------------------------
    def _read_budget(self) -> int:
        """How many bytes the next read may take: never more than the handshake message still lacks."""
        have = len(self._rbuf) - self._rpos
        if self._phase == _OPEN:
            # Past a frame cap of unparsed bytes, stop reading and let the parse run first.
            return int(self._TcpConnection__recvBufferSize) if have <= self._frame_cap else 0
        if self._phase == _AWAIT_HELLO:
            return HELLO_BYTES - have
        if self._phase == _AWAIT_CHALLENGE:
            return CHALLENGE_BYTES - have
        if self._phase == _AWAIT_PROOF:
            if have < PROOF_HEAD_BYTES:
                return PROOF_HEAD_BYTES - have
            return PROOF_HEAD_BYTES + self._rbuf[self._rpos + PROOF_BYTES] - have
        return 0

    def _TcpConnection__processRead(self) -> bool:
        budget = self._read_budget()
        if budget <= 0:
            return False
        try:
            incoming = self._TcpConnection__socket.recv(budget)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.disconnect()
            return False
        if not incoming:
            self.disconnect()
            return False
        self._rbuf += incoming
        if self._phase == _OPEN:
            return self._check_lengths()
        return True

    def _check_lengths(self) -> bool:
        """Refuse an oversized length prefix as soon as it is read, before its body is buffered."""
        # Invariant: every frame before self._scan is whole and its length was checked.
        pos, end = max(self._scan, self._rpos), len(self._rbuf)
        while end - pos >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._rbuf, pos)
            if length > self._frame_cap or length < TAG_BYTES:
                self._refuse(f"a frame length of {length} bytes (cap {self._frame_cap})")
                return False
            if end - pos < _LENGTH.size + length:
                break  # its body is still arriving; the next read checks nothing before it again
            pos += _LENGTH.size + length
        self._scan = pos
        return True

    def _TcpConnection__processParseMessage(self) -> Any:
        if self._phase != _OPEN:
            self._advance_handshake()
            return None
        buf, pos = self._rbuf, self._rpos
        if len(buf) - pos >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buf, pos)
            end = pos + _LENGTH.size + length
            if len(buf) >= end:
                body = bytes(buf[pos + _LENGTH.size : end])
                self._rpos = end
                assert self._opener is not None
                try:
                    return self._opener.open(body)
                except Refused as exc:
                    self._refuse(str(exc))
                    return None
        # No whole frame left: drop what was parsed, keep the partial frame.
        del buf[:pos]
        self._rpos = 0
        self._scan = max(self._scan - pos, 0)
        return None

    # -- the handshake -----------------------------------------------------------------------------------
    def _advance_handshake(self) -> None:
        if self._read_budget() != 0 or self._phase in (_CONNECTING, _CLOSED):
            return  # the message is not complete yet
        message = bytes(self._rbuf[self._rpos :])
        self._rbuf.clear()
        self._rpos = 0
        if self._phase == _AWAIT_HELLO:
            if message[: len(MAGIC)] != MAGIC:
                self._refuse("not an imnode Raft handshake")
                return
            self._nonce_i = message[len(MAGIC) :]
            self._nonce_r = os.urandom(NONCE_BYTES)
            self._phase = _AWAIT_PROOF
            self._send_raw(
                MAGIC + self._nonce_r + handshake_proof(self._auth_key, b"R", self._nonce_i, self._nonce_r)
            )
        elif self._phase == _AWAIT_CHALLENGE:
            nonce_r, proof = (
                message[len(MAGIC) : len(MAGIC) + NONCE_BYTES],
                message[len(MAGIC) + NONCE_BYTES :],
            )
            expected = handshake_proof(self._auth_key, b"R", self._nonce_i, nonce_r)
            if message[: len(MAGIC)] != MAGIC or not hmac.compare_digest(proof, expected):
                self._refuse("the peer does not know the cluster secret")
                return
            self._nonce_r = nonce_r
            addr = self._self_addr
            own = handshake_proof(self._auth_key, b"I", self._nonce_i, nonce_r, addr)
            self._send_raw(own + bytes((len(addr),)) + addr)
            self._open(initiator=True)
            self._on_authenticated("")
        elif self._phase == _AWAIT_PROOF:
            proof, addr = message[:PROOF_BYTES], message[PROOF_HEAD_BYTES:]
            if not hmac.compare_digest(
                proof, handshake_proof(self._auth_key, b"I", self._nonce_i, self._nonce_r, addr)
            ):
                self._refuse("the peer does not know the cluster secret")
                return
            try:
                peer = addr.decode()
            except UnicodeDecodeError:
                self._refuse("the peer's address is not text")
                return
            self._open(initiator=False)
            self._on_authenticated(peer)

    def _open(self, *, initiator: bool) -> None:
        to_responder, to_initiator = session_keys(self._secret, self._nonce_i, self._nonce_r)
        self._sealer = FrameSealer(to_responder if initiator else to_initiator)
        self._opener = FrameOpener(to_initiator if initiator else to_responder)
        self._phase = _OPEN


# -- the transport -------------------------------------------------------------------------------------
class SecureTransport(TCPTransport):
    """PySyncObj's TCP transport with SecureConnection on both ends. Build it with `transport_class`."""

    def __init__(
        self,
        syncObj: Any,
        selfNode: Any,
        otherNodes: Any,
        *,
        secret: bytes,
        frame_cap: int,
        handshake_timeout_s: float,
    ) -> None:
        # Set before the base __init__, which calls addNode for every partner.
        self._secret = secret
        self._auth_key = auth_key(secret)
        self.frame_cap = frame_cap
        self._handshake_timeout_s = handshake_timeout_s
        super().__init__(syncObj, selfNode, otherNodes)

    def _adopt(self, conn: SecureConnection, on_authenticated: Callable[[str], None]) -> None:
        conn._adopt(
            secret=self._secret,
            key=self._auth_key,
            frame_cap=self.frame_cap,
            handshake_timeout_s=self._handshake_timeout_s,
            on_authenticated=on_authenticated,
        )

    # -- outgoing ----------------------------------------------------------------------------------------
    def addNode(self, node: Any) -> None:
        self._nodes.add(node)
        self._nodeAddrToNode[node.address] = node
        if self._shouldConnect(node):
            conf = self._syncObj.conf
            conn = SecureConnection(
                poller=self._syncObj._poller,
                timeout=conf.connectionTimeout,
                sendBufferSize=conf.sendBufferSize,
                recvBufferSize=conf.recvBufferSize,
                keepalive=conf.tcp_keepalive,
            )
            self._adopt(conn, functools.partial(self._on_outgoing_authenticated, conn))
            conn.setOnConnectedCallback(functools.partial(self._onOutgoingConnected, conn))
            conn.setOnMessageReceivedCallback(functools.partial(self._onMessageReceived, node))
            conn.setOnDisconnectedCallback(functools.partial(self._onDisconnected, conn))
            self._connections[node] = conn

    def _onOutgoingConnected(self, conn: SecureConnection) -> None:
        conn.start_initiator(self._selfNode.address)

    def _on_outgoing_authenticated(self, conn: SecureConnection, _peer: str) -> None:
        node = self._connToNode(conn)
        if node is not None:
            self._onNodeConnected(node)

    # -- incoming ----------------------------------------------------------------------------------------
    def _onNewIncomingConnection(self, conn: TcpConnection) -> None:
        # TcpServer builds PySyncObj's own class; this one only adds state and overrides, so swap it in.
        if len(self._unknownConnections) >= MAX_PENDING_HANDSHAKES:
            conn.disconnect()
            return
        conn.__class__ = SecureConnection
        secure: SecureConnection = conn
        self._adopt(secure, functools.partial(self._on_incoming_authenticated, secure))
        secure.start_responder()
        self._unknownConnections.add(secure)
        secure.setOnMessageReceivedCallback(None)  # no message reaches PySyncObj before the handshake
        secure.setOnDisconnectedCallback(functools.partial(self._onDisconnected, secure))

    def _on_incoming_authenticated(self, conn: SecureConnection, peer: str) -> None:
        node = self._nodeAddrToNode.get(peer)
        self._unknownConnections.discard(conn)
        if node is None:
            # Knows the secret but is no member (yet): PySyncObj would drop it the same way.
            conn._refuse(f"{peer!r} is not a member of this cluster")
            return
        if self._shouldConnect(node):
            # This node dials that one; a connection claiming to come from it would take the place of ours.
            conn._refuse(f"{peer!r} is dialled by this node, not the other way")
            return
        old = self._connections.get(node)
        self._connections[node] = conn
        if old is not None and old is not conn:
            old.disconnect()  # a stale connection of the same peer (it reconnected): no longer its node's
        conn.setOnMessageReceivedCallback(functools.partial(self._onMessageReceived, node))
        self._onNodeConnected(node)

    # -- both ----------------------------------------------------------------------------------------------
    def _onTick(self) -> None:
        super()._onTick()
        now = monotonic_time()
        for conn in list(self._unknownConnections) + list(self._connections.values()):
            if isinstance(conn, SecureConnection):
                conn.expire_handshake(now)

    def send(self, node: Any, message: Any) -> bool:
        conn = self._connections.get(node)
        if conn is None or conn.state != CONNECTION_STATE.CONNECTED or not conn.authenticated:
            return False
        conn.send(message)
        return bool(conn.state == CONNECTION_STATE.CONNECTED)


def transport_class(
    secret: str | bytes, *, frame_cap: int, handshake_timeout_s: float
) -> Callable[[Any, Any, Any], SecureTransport]:
    """What `SyncObj(..., transportClass=...)` takes: PySyncObj calls it with (syncobj, self, partners)."""
    key = secret.encode() if isinstance(secret, str) else secret
    return functools.partial(
        SecureTransport, secret=key, frame_cap=frame_cap, handshake_timeout_s=handshake_timeout_s
    )


__all__ = [
    "MAGIC",
    "FrameOpener",
    "FrameSealer",
    "Refused",
    "SecureConnection",
    "SecureTransport",
    "auth_key",
    "check_command",
    "frame_cap_bytes",
    "handshake_proof",
    "session_keys",
    "transport_class",
]
