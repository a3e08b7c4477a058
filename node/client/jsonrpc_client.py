"""A JSON-RPC light client on trio (WuKongIM's EasySDK protocol), for the benchmark and the tests.

It speaks what the EasySDKs speak (node/wire/jsonrpc.py has the shapes): `connect`, `send`, `ping`
requests with string ids, a `recvack` notification for every `recv`, no payload encryption. Answers reach
the caller as the binary client's packets (`Sendack`, `Recv`), so the benchmark counts both protocols with
the same code: `on_sendack` gets every `send` answer (its client_seq is the request id), `on_recv` every
`recv`, in the reader task. A read's `recvack`s go out in one message.

    async with open_jsonrpc_client("127.0.0.1", 5200, "alice") as alice:
        seqs, messages = alice.prepare_sends([("bob", 1, b'{"content":"hi"}')])
        await alice.write_frames(messages)
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from node.client.client import ClientError, _close_quietly, _open_transport
from node.gateway.transports import TRANSPORT_ERRORS, WebSocketTransport
from node.wire.protocol import FLAG_NO_PERSIST, FLAG_RED_DOT, FLAG_SYNC_ONCE, Reason, Recv, Sendack

_FLAGS = (("noPersist", FLAG_NO_PERSIST), ("redDot", FLAG_RED_DOT), ("syncOnce", FLAG_SYNC_ONCE))


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class JsonRpcClient:
    def __init__(
        self,
        transport: WebSocketTransport,
        on_recv: Callable[[Recv], None] | None,
        on_sendack: Callable[[Sendack], None] | None,
    ) -> None:
        self.transport = transport
        self.on_recv = on_recv
        self.on_sendack = on_sendack
        self.disconnected = trio.Event()
        self.disconnect_reason: int | None = None
        self.connack: dict[str, Any] = {}
        self._seq = 0
        self._answers: dict[str, Any] = {}
        self._answered = trio.Event()
        self._write_lock = trio.Lock()  # the reader's recvacks and the senders' sends share the socket

    def prepare_sends(self, items: Sequence[tuple[str, int, bytes]]) -> tuple[list[int], list[bytes]]:
        """`send` requests for (channel_id, channel_type, payload) items: their client_seqs (the request
        ids, as numbers) and the requests (`write_frames` puts the ones it is given in one message)."""
        seqs, parts = [], []
        for channel_id, channel_type, payload in items:
            self._seq += 1
            seqs.append(self._seq)
            params = {
                "channelId": channel_id,
                "channelType": channel_type,
                "clientMsgNo": uuid.uuid4().hex,
                "payload": base64.b64encode(payload).decode("ascii"),
                "header": {"redDot": True},
            }
            parts.append(_dumps({"id": str(self._seq), "method": "send", "params": params}))
        return seqs, parts

    async def write_frames(self, requests: Sequence[bytes]) -> None:
        """Write requests in one WebSocket message (the node takes several JSON objects in one)."""
        try:
            async with self._write_lock:
                await self.transport.send([b"\n".join(requests)])
        except TRANSPORT_ERRORS as exc:
            raise ClientError(f"connection lost: {exc}") from None

    async def request(self, method: str, params: dict[str, Any], timeout_s: float = 10.0) -> Any:
        """Send one request and wait for its answer (the `result`, or ClientError for an `error`)."""
        self._seq += 1
        request_id = f"r{self._seq}"
        await self.write_frames([_dumps({"id": request_id, "method": method, "params": params})])
        with trio.move_on_after(timeout_s):
            while request_id not in self._answers and not self.disconnected.is_set():
                self._answered = trio.Event()
                await self._answered.wait()
        answer = self._answers.pop(request_id, None)
        if answer is None:
            raise ClientError(f"no answer to {method} within {timeout_s}s")
        if "error" in answer:
            raise ClientError(f"{method}: error {answer['error']}")
        return answer.get("result")

    async def ping(self, timeout_s: float = 10.0) -> None:
        await self.request("ping", {}, timeout_s)

    async def read_loop(self) -> None:
        """Route every message the node sends; acknowledge each `recv` (as the SDKs do, one by one)."""
        try:
            while True:
                data = await self.transport.receive()
                if not data:
                    break
                ack = self._take(json.loads(data))
                if ack is not None:
                    async with self._write_lock:
                        await self.transport.send([ack])
        except (*TRANSPORT_ERRORS, ValueError):
            pass
        finally:
            self.disconnected.set()
            self._answered.set()

    def _take(self, message: dict[str, Any]) -> bytes | None:
        """Handle one message; the `recvack` to write for a `recv`."""
        method = message.get("method")
        if method == "recv":
            params = message["params"]
            self._recv(params)
            ack = {"messageId": params["messageId"], "messageSeq": params["messageSeq"]}
            return _dumps({"method": "recvack", "params": ack})
        elif method == "disconnect":
            self.disconnect_reason = int(message["params"].get("reasonCode", 0))
            self.disconnected.set()
        elif "id" in message:
            request_id = message["id"]
            if isinstance(request_id, str) and request_id.isdigit() and self.on_sendack is not None:
                result = message.get("result") or {}
                self.on_sendack(
                    Sendack(
                        int(result.get("messageId", 0)),
                        int(request_id),
                        int(result.get("messageSeq", 0)),
                        int(result.get("reasonCode", Reason.SYSTEM_ERROR)),
                    )
                )
            else:
                self._answers[str(request_id)] = message
                self._answered.set()
        return None

    def _recv(self, params: dict[str, Any]) -> None:
        if self.on_recv is None:
            return
        flags = sum(bit for name, bit in _FLAGS if params.get("header", {}).get(name))
        self.on_recv(
            Recv(
                setting=0,
                msg_key="",
                from_uid=params["fromUid"],
                channel_id=params["channelId"],
                channel_type=params["channelType"],
                client_msg_no=params.get("clientMsgNo", ""),
                message_id=int(params["messageId"]),
                message_seq=params["messageSeq"],
                timestamp=params["timestamp"],
                payload=base64.b64decode(params["payload"]),
                flags=flags,
            )
        )


@asynccontextmanager
async def open_jsonrpc_client(
    host: str,
    port: int,
    uid: str,
    *,
    token: str = "",
    device_flag: int = 0,
    timeout_s: float = 10.0,
    on_recv: Callable[[Recv], None] | None = None,
    on_sendack: Callable[[Sendack], None] | None = None,
) -> AsyncIterator[JsonRpcClient]:
    """A connected JsonRpcClient (its `connect` answered with reason 1) for the duration of the block."""
    try:
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(timeout_s):
                    transport = await _open_transport(host, port, True, nursery, None)
            except (OSError, trio.TooSlowError, *TRANSPORT_ERRORS) as exc:
                raise ClientError(f"cannot connect to {host}:{port}: {exc}") from None
            assert isinstance(transport, WebSocketTransport)
            transport.text = transport.text_allowed = True
            client = JsonRpcClient(transport, on_recv, on_sendack)
            try:
                nursery.start_soon(client.read_loop)
                result = await client.request(
                    "connect",
                    {
                        "uid": uid,
                        "token": token,
                        "deviceId": uuid.uuid4().hex,
                        "deviceFlag": device_flag,
                        "clientTimestamp": int(time.time() * 1000),
                    },
                    timeout_s,
                )
                if result.get("reasonCode") != Reason.SUCCESS:
                    raise ClientError(f"connect refused: reason {result.get('reasonCode')}")
                client.connack = result
                yield client
            finally:
                await _close_quietly(transport)
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps even a lone exception (as open_client): hand that one back as itself.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
