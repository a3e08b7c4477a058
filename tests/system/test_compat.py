"""Session rules as the WuKongIM SDKs expect them (issue 14), at the wire of one real node.

- every packet at the version the client announced, capped at the latest; CONNACK's version byte above 3;
- DISCONNECT only for a kick: an idle timeout and a snapshot install close without one;
- login rules by device level (WuKongIM `user/handler/event_connect.go`);
- a banned user is refused at CONNECT, and `/user/token` answers it as WuKongIM does;
- msg.offline counts a user offline without a master device online (real apply into a real LMDB, and end
  to end through a real webhook receiver).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from node.client import ConnectRefused, open_client
from node.cluster.webhooks import offline_uids
from node.config import WebhookSettings
from node.wire.crypto import generate_keypair
from node.wire.protocol import (
    LATEST_VERSION,
    Connack,
    Connect,
    Disconnect,
    FrameDecoder,
    Reason,
    Recv,
    encode,
)
from raft.apply import apply_ops
from raft.commands import node_epoch_op, presence_change, presence_op
from storage.store import Store
from tests.api.test_http_api import TOKEN, Api
from tests.cluster.test_webhooks import Receiver
from tests.conftest import RunningNode, running_node, single_node_config, wait_for

TEXT = b'{"content":"hello","type":1}'


async def raw_frames(stream: trio.SocketStream, count: int, timeout_s: float = 5.0) -> list[bytes]:
    """The next `count` whole frames the node writes, as bytes (PONG and PING are one byte)."""
    buf = bytearray()
    frames: list[bytes] = []
    with trio.fail_after(timeout_s):
        while len(frames) < count:
            while buf and len(frames) < count:
                if buf[0] >> 4 in (7, 8):
                    frames.append(bytes(buf[:1]))
                    del buf[:1]
                    continue
                length, shift, i = 0, 0, 1
                while i < len(buf):
                    length |= (buf[i] & 0x7F) << shift
                    shift += 7
                    i += 1
                    if not buf[i - 1] & 0x80:
                        break
                else:
                    break
                if len(buf) < i + length:
                    break
                frames.append(bytes(buf[: i + length]))
                del buf[: i + length]
            if len(frames) < count:
                data = await stream.receive_some(65536)
                assert data, "the node closed the connection"
                buf += data
    return frames


async def read_until_closed(stream: trio.SocketStream, timeout_s: float = 5.0) -> bytes:
    received = bytearray()
    with trio.fail_after(timeout_s):
        while data := await stream.receive_some(65536):
            received += data
    return bytes(received)


# -- versions ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 9])
async def test_every_packet_is_encoded_at_the_announced_version(tmp_path: Path, version: int) -> None:
    async with running_node(single_node_config(tmp_path / "n1", encryption=False)) as node:
        stream = await trio.open_tcp_stream(*node.tcp)
        async with stream:
            _private, public = generate_keypair()
            hello = Connect(version, 0, "dev", "bob", "", int(time.time() * 1000), public)
            await stream.send_all(encode(hello, version))
            [connack_frame] = await raw_frames(stream, 1)
            running = min(version, LATEST_VERSION)
            if version > 3:
                assert connack_frame[0] == 0x21 and connack_frame[2] == running  # the server's version byte
            else:
                assert connack_frame[0] == 0x20  # none: the SDKs read time_diff first
            decoder = FrameDecoder(version=running)
            decoder.feed(connack_frame)
            connack = decoder.next_packet()
            assert isinstance(connack, Connack) and connack.reason_code == Reason.SUCCESS
            assert encode(connack, running) == connack_frame
            assert connack.node_id == (1 if running >= 4 else 0)

            async with open_client(*node.tcp, "alice", encrypt=False) as alice:
                ack = await alice.send("bob", 1, TEXT)
            [recv_frame] = await raw_frames(stream, 1)
            decoder.feed(recv_frame)
            recv = decoder.next_packet()
            assert isinstance(recv, Recv) and recv.message_id == ack.message_id and recv.payload == TEXT
            assert encode(recv, running) == recv_frame  # every byte where this version puts it
            # From version 3 on a RECV carries expire (4 bytes) after the channel type; 1 and 2 do not.
            assert len(recv_frame) - len(encode(recv, 2)) == (4 if running >= 3 else 0)


# -- DISCONNECT only for a kick ---------------------------------------------------------------------------
async def test_an_idle_timeout_closes_without_disconnect(tmp_path: Path) -> None:
    async with running_node(single_node_config(tmp_path / "n1", idle_timeout_s=0.5)) as node:
        stream = await trio.open_tcp_stream(*node.tcp)
        async with stream:
            _private, public = generate_keypair()
            await stream.send_all(encode(Connect(5, 0, "d", "idle", "", 0, public), 5))
            await raw_frames(stream, 1)  # CONNACK
            rest = await read_until_closed(stream)
        assert rest == b""  # closed, no DISCONNECT: an SDK reconnects
        assert node.node.gateway.idle_timeouts == 1


async def test_a_shutdown_closes_without_disconnect(tmp_path: Path) -> None:
    """A node stopping (SIGTERM cancels the node as leaving this block does) closes its clients' sockets
    without a DISCONNECT, so the SDKs reconnect to another node or when it is back."""
    async with running_node(single_node_config(tmp_path / "n1")) as node:
        stream = await trio.open_tcp_stream(*node.tcp)
        _private, public = generate_keypair()
        await stream.send_all(encode(Connect(5, 0, "d", "stays", "", 0, public), 5))
        [connack] = await raw_frames(stream, 1)
        assert connack[0] >> 4 == 2  # CONNACK
    async with stream:
        assert await read_until_closed(stream) == b""


async def test_a_snapshot_install_closes_every_client_without_disconnect(tmp_path: Path) -> None:
    """The handler the Raft layer calls after installing a snapshot (tests/js has the real install)."""
    async with running_node(single_node_config(tmp_path / "n1")) as node:
        async with (
            open_client(*node.tcp, "alice") as alice,
            open_client(*node.ws, "bob", websocket=True) as bob,
        ):
            node.node._on_snapshot_installed()
            with trio.fail_after(5):
                await alice.disconnected.wait()
                await bob.disconnected.wait()
            assert alice.disconnect_reason is None and bob.disconnect_reason is None
        async with open_client(*node.tcp, "alice") as again:  # and they come back
            await again.ping()


# -- login rules by device level ----------------------------------------------------------------------
async def test_login_rules_by_device_level(tmp_path: Path) -> None:
    config = single_node_config(tmp_path / "n1", manager_token=TOKEN, token_auth=True)
    async with running_node(config) as node:
        api = Api(node.http)
        await api.post("/user/token", {"uid": "web", "token": "w", "device_flag": 1, "device_level": 0})
        await api.post("/user/token", {"uid": "app", "token": "a", "device_flag": 0, "device_level": 1})
        tcp = node.tcp
        # Slaves: two tabs (two device ids) live side by side; the same device id replaces its older
        # connection with a plain close.
        async with (
            open_client(*tcp, "web", token="w", device_flag=1, device_id="tab-1") as tab1,
            open_client(*tcp, "web", token="w", device_flag=1, device_id="tab-2") as tab2,
        ):
            await tab1.ping()
            async with open_client(*tcp, "web", token="w", device_flag=1, device_id="tab-1") as tab1_again:
                with trio.fail_after(5):
                    await tab1.disconnected.wait()
                assert tab1.disconnect_reason is None
                await tab2.ping()
                await tab1_again.ping()
        # A master kicks other device ids of its flag (DISCONNECT 12) and closes its own device id's older
        # connection without DISCONNECT; other flags are left alone.
        async with (
            open_client(*tcp, "app", token="a", device_flag=0, device_id="phone-1") as phone1,
            open_client(*tcp, "app", token="a", device_flag=0, device_id="phone-1") as phone1_again,
        ):
            with trio.fail_after(5):
                await phone1.disconnected.wait()
            assert phone1.disconnect_reason is None
            await api.post("/user/token", {"uid": "app", "token": "w2", "device_flag": 1, "device_level": 0})
            async with (
                open_client(*tcp, "app", token="w2", device_flag=1, device_id="web") as other_flag,
                open_client(*tcp, "app", token="a", device_flag=0, device_id="phone-2"),
            ):
                with trio.fail_after(5):
                    await phone1_again.disconnected.wait()
                assert phone1_again.disconnect_reason == Reason.CONNECT_KICK
                await other_flag.ping()


# -- bans -------------------------------------------------------------------------------------------------
async def test_a_banned_user_is_refused_at_connect_and_gets_no_token(tmp_path: Path) -> None:
    async with running_node(single_node_config(tmp_path / "n1", manager_token=TOKEN)) as node:
        api = Api(node.http)
        await api.post("/channel/info", {"channel_id": "mallory", "channel_type": 1, "ban": 1})
        with pytest.raises(ConnectRefused) as refused:
            async with open_client(*node.tcp, "mallory"):
                pass
        assert refused.value.reason_code == Reason.BAN
        # /user/token answers HTTP 200 with the reason as status (WuKongIM's ResponseStatus) and stores none.
        answer = await api.post("/user/token", {"uid": "mallory", "token": "t", "device_flag": 0})
        assert answer == {"status": Reason.BAN}
        with node.node.store.read() as txn:
            assert txn.user("mallory") is None
        await api.post("/channel/info", {"channel_id": "mallory", "channel_type": 1, "ban": 0, "disband": 1})
        assert await api.post("/user/token", {"uid": "mallory", "token": "t"}) == {"status": Reason.DISBAND}
        await api.post("/channel/info", {"channel_id": "mallory", "channel_type": 1})  # every flag back to 0
        assert await api.post("/user/token", {"uid": "mallory", "token": "t"}) == {"status": 200}
        async with open_client(*node.tcp, "mallory") as mallory:
            await mallory.ping()
        assert "system uid" in await api.refused("POST", "/user/token", {"uid": "____system", "token": "t"})


# -- msg.offline: no master device online -----------------------------------------------------------------
def test_offline_means_no_master_device_online(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"), map_size=1 << 26)
    try:
        changes = [
            presence_change("web_only", 1, 1, 0, True, "tab"),  # a slave (web)
            presence_change("phone", 2, 0, 1, True, "p"),  # a master (app)
            presence_change("both", 3, 1, 0, True, "tab"),
            presence_change("both", 4, 0, 1, True, "p"),
        ]
        with store.write() as txn:
            apply_ops(txn, [node_epoch_op(1, 5), presence_op(1, 5, changes)], 1)
        with store.read() as txn:
            got = offline_uids(txn, ["web_only", "phone", "both", "nobody", "sender"], "sender", 2)
        assert got == ["web_only", "nobody"]
        # The phone leaves after the message at index 2: it was online then and stays left out; the web
        # tab leaving changes nothing (it never counted).
        gone = [presence_change("phone", 2, 0, 1, False), presence_change("web_only", 1, 1, 0, False)]
        with store.write() as txn:
            apply_ops(txn, [presence_op(1, 5, gone)], 3)
        with store.read() as txn:
            assert offline_uids(txn, ["web_only", "phone"], "sender", 2) == ["web_only"]
            assert offline_uids(txn, ["web_only", "phone"], "sender", 4) == ["web_only", "phone"]
    finally:
        store.close()


async def test_msg_offline_lists_a_user_online_on_the_web_only(tmp_path: Path) -> None:
    """End to end (real node, real webhook receiver): a recipient online with a slave device only (a browser)
    is still in msg.offline's `to_uids`, so it gets a phone push, though it received the message live; one
    with a master device (an app) online is not (WuKongIM `event_distribute.go`)."""
    receiver = Receiver()
    hook = WebhookSettings(
        url=receiver.url, events=("msg.offline",), backoff_initial_s=0.05, backoff_max_s=0.2, attempts=1000
    )
    config = single_node_config(tmp_path / "n1", manager_token=TOKEN, token_auth=True, webhook=hook)
    async with trio.open_nursery() as nursery:
        await receiver.up(nursery)
        async with running_node(config) as node:
            api = Api(node.http)

            def offline_of(message_id: int) -> list[list[str]]:
                return [
                    body["to_uids"]
                    for event, body, _id in receiver.posts
                    if event == "msg.offline" and body["message_id"] == message_id
                ]

            # Until the leader has published the webhook settings, a send writes no event: wait for one.
            marker = await api.send("alice", "nobody", 1, b"marker", cmn="marker")
            await wait_for(lambda: bool(offline_of(marker["message_id"])), 20, "the first msg.offline")
            await api.post("/user/token", {"uid": "alice", "token": "a", "device_flag": 0, "device_level": 1})
            await api.post("/user/token", {"uid": "webby", "token": "w", "device_flag": 1, "device_level": 0})
            await api.post("/user/token", {"uid": "appy", "token": "p", "device_flag": 0, "device_level": 1})
            await api.post(
                "/channel",
                {"channel_id": "g", "channel_type": 2, "subscribers": ["alice", "webby", "appy", "gone"]},
            )
            async with (
                open_client(*node.tcp, "alice", token="a") as alice,
                open_client(*node.tcp, "webby", token="w", device_flag=1) as webby,
                open_client(*node.tcp, "appy", token="p") as appy,
            ):
                # Presence commits through Raft: send once both are online in it.
                with trio.fail_after(10):
                    while len(await api.post("/user/onlinestatus", ["webby", "appy"])) < 2:  # noqa: ASYNC110
                        await trio.sleep(0.02)
                ack = await alice.send("g", 2, TEXT)
                assert ack.reason_code == Reason.SUCCESS
                for device in (webby, appy):  # both online, both got it live
                    assert (await device.recv()).message_id == ack.message_id
                await wait_for(
                    lambda: bool(offline_of(ack.message_id)), 20, "msg.offline of the group message"
                )
        nursery.cancel_scope.cancel()
    assert [sorted(to_uids) for to_uids in offline_of(ack.message_id)] == [["gone", "webby"]]


async def test_a_disconnect_packet_is_never_sent_on_a_close_by_the_client(node: RunningNode) -> None:
    """A client's own DISCONNECT is answered by a close, not by a DISCONNECT back."""
    stream = await trio.open_tcp_stream(*node.tcp)
    async with stream:
        _private, public = generate_keypair()
        await stream.send_all(encode(Connect(5, 0, "d", "leaving", "", 0, public), 5))
        await raw_frames(stream, 1)
        await stream.send_all(encode(Disconnect(0, "bye"), 5))
        assert await read_until_closed(stream) == b""
    await wait_for(lambda: not node.node.registry.of_uid("leaving"), 5, "gone from the registry")
