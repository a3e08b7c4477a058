"""The real WuKongIM JS SDK (npm `wukongimjssdk`, driven by sdk_driver.mjs under Node.js) on a real 3-node
cluster: it connects, receives live messages (its conversation's unread badge raised only by those with
RedDot), gets back online on its own after its node installs a snapshot (which closes every client without
DISCONNECT), and stops reconnecting once kicked, as with WuKongIM. Also, without the SDK: the device-level
login rules across nodes.

The packages are installed by `npm ci` from tests/js/package-lock.json into tests/js/node_modules the
first time (and whenever the lock file is newer). Skipped, saying so, only where Node.js is not installed.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from node.client import open_client
from node.tools import operator as op
from node.wire.protocol import Reason
from tests.cluster_harness import MANAGER_TOKEN, Cluster, write_cluster_toml
from tests.conftest import http_json

JS_DIR = Path(__file__).resolve().parent
NPM_TIMEOUT_S = 300
# The SDK waits 3 s before each reconnect (connect_manager.js `reConnect`): a kicked SDK that has not
# reconnected after twice that never will.
SDK_RECONNECT_DELAY_S = 3.0
CONNECTED, DISCONNECTED, KICKED = 1, 0, 4  # the SDK's ConnectStatus


def install_sdk() -> str:
    """The node binary, with the SDK installed under tests/js/node_modules; skips without Node.js."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js (node and npm) is not installed: the WuKongIM JS SDK tests need it")
    stamp = JS_DIR / "node_modules" / ".package-lock.json"
    lock = JS_DIR / "package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=JS_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
        )
        assert done.returncode == 0, f"npm ci in {JS_DIR} failed:\n{done.stdout}\n{done.stderr}"
    return node


class SdkDriver:
    """One WuKongIM JS SDK instance in its own Node.js process; its events as they arrive."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []
        self._changed = trio.Event()

    async def read_events(self) -> None:
        assert self.process.stdout is not None
        buffered = b""
        async for chunk in self.process.stdout:
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                if line.strip():
                    self.events.append(json.loads(line))
            self._changed.set()
            self._changed = trio.Event()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    async def wait_for(self, what: str, found: Callable[[], Any], timeout_s: float = 20.0) -> Any:
        """Until `found()` is truthy (re-checked on every event), at most `timeout_s`."""
        with trio.move_on_after(timeout_s):
            while not (result := found()):
                await self._changed.wait()
            return result
        raise AssertionError(f"the JS SDK did not report {what} within {timeout_s}s: {self.events}")

    def status(self) -> int | None:
        statuses = self.of("status")
        return statuses[-1]["status"] if statuses else None

    def opened(self) -> int:
        return len(self.of("ws_open"))

    async def send_text(self, channel_id: str, channel_type: int, text: str) -> dict[str, Any]:
        """Send a text message as an app does (`chatManager.send`, which sets RedDot); its SENDACK."""
        before = len(self.of("sendack"))
        assert self.process.stdin is not None
        command = {"send": {"channel_id": channel_id, "channel_type": channel_type, "text": text}}
        await self.process.stdin.send_all(json.dumps(command).encode() + b"\n")
        [ack] = await self.wait_for("a SENDACK", lambda: self.of("sendack")[before:])
        return ack


@asynccontextmanager
async def js_sdk(node_binary: str, ws_url: str, uid: str, token: str, log: Path) -> AsyncIterator[SdkDriver]:
    with log.open("ab") as stderr:
        process = await trio.lowlevel.open_process(
            [node_binary, "--import", "./register.mjs", "sdk_driver.mjs", ws_url, uid, token],
            cwd=JS_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    driver = SdkDriver(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.read_events)
            yield driver
            nursery.cancel_scope.cancel()
    finally:
        assert process.stdin is not None
        with trio.move_on_after(5) as closing:
            closing.shield = True
            await process.stdin.aclose()  # the driver disconnects the SDK and exits
            await process.wait()
        if process.returncode is None:
            process.kill()  # this test's own child, by its handle
            with trio.move_on_after(5) as reaping:
                reaping.shield = True
                await process.wait()


@pytest.fixture(scope="module")
def node_binary() -> str:
    return install_sdk()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Token auth on (so device levels count); logs compact after 20 entries (so a node that falls behind
    catches up by snapshot)."""
    path = write_cluster_toml(
        tmp_path_factory.mktemp("jssdk") / "cluster.toml",
        tuning={"log_compaction_min_entries": 20, "log_compaction_min_time_s": 1.0},
    )
    path.write_text(path.read_text().replace("[cluster]\n", "[cluster]\ntoken_auth = true\n", 1))
    started = Cluster(path)
    try:
        started.start_all()
        yield started
    finally:
        started.stop_all()


async def set_token(cluster: Cluster, node_id: str, uid: str, token: str, flag: int, level: int) -> None:
    """Committed through the node the user logs in to, so that node has applied it when it answers."""
    body = {"uid": uid, "token": token, "device_flag": flag, "device_level": level}
    status, answer = await http_json(
        cluster.http(node_id), "POST", "/user/token", body, headers={"token": MANAGER_TOKEN}
    )
    assert (status, answer) == (200, {"status": 200}), answer


async def connections_of(cluster: Cluster, node_id: str, uid: str) -> list[dict[str, Any]]:
    status, answer = await http_json(
        cluster.http(node_id), "GET", f"/connz?uid={uid}", headers={"token": MANAGER_TOKEN}
    )
    assert status == 200, answer
    return list(answer["connections"])


def roles(cluster: Cluster) -> tuple[str, str]:
    """(a follower, another node) of the cluster."""
    leader = op.cluster_status(cluster.config)["leader"]
    follower = next(n for n in ("n1", "n2", "n3") if n != leader)
    other = next(n for n in ("n1", "n2", "n3") if n != follower)
    return follower, other


def received(sdk: SdkDriver, message_id: int | str) -> Callable[[], list[dict[str, Any]]]:
    return lambda: [m for m in sdk.of("message") if m["message_id"] == str(message_id)]


def conversation_after(sdk: SdkDriver, message_id: int | str) -> Callable[[], list[dict[str, Any]]]:
    """The SDK's conversation as its conversation manager left it after the message `message_id`."""
    return lambda: [c for c in sdk.of("conversation") if c["last_message_id"] == str(message_id)]


async def restart_behind_a_snapshot(cluster: Cluster, behind: str, entry: str) -> None:
    """Kill `behind` (kill -9: its clients see the socket close, no DISCONNECT), commit enough for the others
    to compact their logs past it, start it again: it catches up by installing a snapshot, which closes
    whatever clients reached it meanwhile, again without DISCONNECT.

    (A node only stopped with SIGSTOP keeps its connections, but PySyncObj's leader queues the missed
    entries for it without limit and it then catches up from the log, without a snapshot.)"""
    installs = cluster.log(behind).count("installed snapshot at applied index")
    await trio.to_thread.run_sync(cluster.kill9, behind)
    await set_token(cluster, entry, "loader", "l", 0, 0)
    async with open_client(*cluster.tcp(entry), "loader", token="l") as loader:
        for batch in range(30):
            acks = await loader.send_many([("sink", 1, f"s{batch}-{i}".encode()) for i in range(50)])
            assert all(a.reason_code == Reason.SUCCESS for a in acks)
    live = [n for n in ("n1", "n2", "n3") if n != behind]

    def compacted() -> bool:
        statuses = [op.node_status(cluster.config, n) for n in live]
        return all(s is not None and s["log_len"] < 25 for s in statuses)

    with trio.fail_after(30):
        while not await trio.to_thread.run_sync(compacted):  # noqa: ASYNC110 - state in other processes
            await trio.sleep(0.2)
    await trio.to_thread.run_sync(cluster.start, behind)
    await trio.to_thread.run_sync(cluster.wait_serving, behind)
    with trio.fail_after(30):
        while cluster.log(behind).count("installed snapshot at applied index") <= installs:  # noqa: ASYNC110
            await trio.sleep(0.1)


async def test_the_js_sdk_receives_live_reconnects_after_a_snapshot_and_stays_kicked(
    node_binary: str, cluster: Cluster, tmp_path: Path
) -> None:
    behind, entry = roles(cluster)
    ws_url = f"ws://{cluster.config.node(behind).ws}"
    await set_token(cluster, behind, "jsweb", "js-token", 1, 0)  # the SDK logs in as web (flag 1)
    await set_token(cluster, entry, "alice", "alice-t", 0, 1)
    async with (
        js_sdk(node_binary, ws_url, "jsweb", "js-token", tmp_path / "sdk.log") as sdk,
        open_client(*cluster.tcp(entry), "alice", token="alice-t") as alice,
    ):
        await sdk.wait_for("a connection", lambda: sdk.status() == CONNECTED)

        # A live message, sent on another node.
        ack = await alice.send("jsweb", 1, b'{"content":"hello from alice","type":1}')
        assert ack.reason_code == Reason.SUCCESS
        [message] = await sdk.wait_for("the live message", lambda: sdk.of("message"))
        assert (message["channel_id"], message["channel_type"], message["from_uid"]) == ("alice", 1, "alice")
        assert (message["text"], message["message_id"]) == ("hello from alice", str(ack.message_id))
        [conversation] = await sdk.wait_for("the conversation", lambda: sdk.of("conversation"))
        assert (conversation["channel_id"], conversation["action"]) == ("alice", 0)  # 0: added
        # The client sends with RedDot, as apps do: the SDK raises the conversation's unread badge.
        assert message["red_dot"] is True
        assert (conversation["unread"], conversation["all_unread"]) == (1, 1)

        # Its node dies and comes back through a snapshot install: the SDK sees closes without DISCONNECT,
        # keeps trying (every 3 s) while the node is down, and is back online once it serves again.
        await restart_behind_a_snapshot(cluster, behind, entry)
        await sdk.wait_for("the close", lambda: DISCONNECTED in [e["status"] for e in sdk.of("status")])
        # The install closed every connection it found: the SDK is online again only if it reconnected.
        await sdk.wait_for("a reconnect", lambda: sdk.opened() >= 2 and sdk.status() == CONNECTED, 30)
        assert not [e for e in sdk.of("status") if e["status"] == KICKED]
        # Online again means live messages arrive. The status seen may predate a close still on its way
        # (the install closes connections made just before it), so send until one arrives, bounded: the
        # SDK reconnects within its 3 s delay.
        with trio.fail_after(30):
            while True:
                again = await alice.send("jsweb", 1, b'{"content":"after the snapshot","type":1}')
                assert again.reason_code == Reason.SUCCESS
                with trio.move_on_after(SDK_RECONNECT_DELAY_S + 1):
                    await sdk.wait_for("a live message after the reconnect", received(sdk, again.message_id))
                    break

        # A kick (DISCONNECT, reason 12): the SDK gives up, as with WuKongIM.
        [conn] = await connections_of(cluster, behind, "jsweb")
        status, answer = await http_json(
            cluster.http(entry),  # another node: the kick is handed to the connection's node
            "POST",
            "/conn/kick",
            {"uid": "jsweb", "conn_id": conn["id"], "node_id": conn["node_id"]},
            headers={"token": MANAGER_TOKEN},
        )
        assert (status, answer) == (200, {"status": 200})
        kicked = await sdk.wait_for(
            "the kick", lambda: [e for e in sdk.of("status") if e["status"] == KICKED]
        )
        assert kicked[0]["reason"] == Reason.CONNECT_KICK
        opened = sdk.opened()
        await trio.sleep(2 * SDK_RECONNECT_DELAY_S)  # proving an absence: no condition to wait on
        assert sdk.opened() == opened, "the SDK reconnected after a kick"
        assert await connections_of(cluster, behind, "jsweb") == []


async def test_the_js_sdk_counts_unread_for_live_messages_with_red_dot_only(
    node_binary: str, cluster: Cluster, tmp_path: Path
) -> None:
    """The unread badge an app shows is the SDK's conversation manager's count, raised only by a message
    whose RECV carries RedDot. Live messages to a JS SDK on one node, from another node: the sender's own
    JS SDK (`chatManager.send` sets RedDot on every message, as TangSengDaoDao's apps send chat messages),
    `/message/send` with and without `header.red_dot` (what a business server sends), and a client with
    and without the flag. The sender's own other device gets its message without RedDot."""
    reader_node, sender_node = roles(cluster)
    await set_token(cluster, reader_node, "jsbob", "bob-web", 1, 0)
    await set_token(cluster, sender_node, "jscarol", "carol-web", 1, 0)
    await set_token(cluster, sender_node, "jscarol", "carol-app", 0, 1)
    reader_ws = f"ws://{cluster.config.node(reader_node).ws}"
    sender_ws = f"ws://{cluster.config.node(sender_node).ws}"
    async with (
        js_sdk(node_binary, reader_ws, "jsbob", "bob-web", tmp_path / "bob.log") as bob,
        js_sdk(node_binary, sender_ws, "jscarol", "carol-web", tmp_path / "carol.log") as carol_web,
        open_client(*cluster.tcp(sender_node), "jscarol", token="carol-app") as carol_app,
    ):
        await bob.wait_for("a connection", lambda: bob.status() == CONNECTED)
        await carol_web.wait_for("a connection", lambda: carol_web.status() == CONNECTED)

        async def badge_after(message_id: int | str, red_dot: bool, unread: int) -> None:
            [message] = await bob.wait_for(f"message {message_id}", received(bob, message_id))
            assert (message["channel_id"], message["from_uid"]) == ("jscarol", "jscarol")
            assert message["red_dot"] is red_dot, message
            [conversation] = await bob.wait_for(
                f"the conversation after message {message_id}", conversation_after(bob, message_id)
            )
            assert conversation["channel_id"] == "jscarol"
            assert (conversation["unread"], conversation["all_unread"]) == (unread, unread), conversation

        async def api_send(header: dict[str, int] | None) -> int:
            body: dict[str, Any] = {
                "from_uid": "jscarol",
                "channel_id": "jsbob",
                "channel_type": 1,
                "payload": base64.b64encode(b'{"content":"from the business server","type":1}').decode(),
            }
            if header is not None:
                body["header"] = header
            status, answer = await http_json(
                cluster.http(sender_node), "POST", "/message/send", body, headers={"token": MANAGER_TOKEN}
            )
            assert status == 200, answer
            return int(answer["message_id"])

        # The app's own send: RedDot set by the SDK.
        ack = await carol_web.send_text("jsbob", 1, "hello from carol's browser")
        assert ack["reason"] == Reason.SUCCESS
        await badge_after(ack["message_id"], True, 1)
        # A business server's send: red_dot only when its header says so (WuKongIM's default is 0).
        await badge_after(await api_send(None), False, 1)
        await badge_after(await api_send({"red_dot": 0}), False, 1)
        await badge_after(await api_send({"red_dot": 1}), True, 2)
        # A client's send, without and with the flag.
        plain = await carol_app.send("jsbob", 1, b'{"content":"no badge","type":1}', flags=0)
        assert plain.reason_code == Reason.SUCCESS
        await badge_after(plain.message_id, False, 2)
        dotted = await carol_app.send("jsbob", 1, b'{"content":"badge","type":1}')
        assert dotted.reason_code == Reason.SUCCESS
        await badge_after(dotted.message_id, True, 3)
        # The sender's own browser gets the app's message without RedDot (WuKongIM `event_pushonline.go`).
        [echo] = await carol_web.wait_for("the sender's own message", received(carol_web, dotted.message_id))
        assert (echo["channel_id"], echo["red_dot"]) == ("jsbob", False)


async def test_login_rules_by_device_level_across_nodes(cluster: Cluster) -> None:
    """A master login on one node kicks the other device ids of its flag on every node; the same device id
    logging in elsewhere closes its older connection without DISCONNECT; slaves leave each other alone."""
    first, second = roles(cluster)
    for node_id in (first, second):
        await set_token(cluster, node_id, "mia", "m", 0, 1)  # app: master
        await set_token(cluster, node_id, "mia", "w", 1, 0)  # web: slave
    async with (
        open_client(*cluster.tcp(first), "mia", token="m", device_flag=0, device_id="phone-1") as phone1,
        open_client(*cluster.tcp(first), "mia", token="w", device_flag=1, device_id="tab-1") as tab1,
    ):
        await phone1.ping()
        async with open_client(
            *cluster.tcp(second), "mia", token="w", device_flag=1, device_id="tab-2"
        ) as tab2:
            async with open_client(
                *cluster.tcp(second), "mia", token="m", device_flag=0, device_id="phone-2"
            ):
                with trio.fail_after(15):
                    await phone1.disconnected.wait()
                assert phone1.disconnect_reason == Reason.CONNECT_KICK
                await tab1.ping()  # a slave of another device id, on another node: untouched
                await tab2.ping()
            async with open_client(*cluster.tcp(second), "mia", token="w", device_flag=1, device_id="tab-1"):
                with trio.fail_after(15):
                    await tab1.disconnected.wait()
                assert tab1.disconnect_reason is None  # the same device: closed, not kicked
                await tab2.ping()


async def test_the_js_sdk_1_0_stays_connected_through_a_stream_it_cannot_read(
    node_binary: str, cluster: Cluster, tmp_path: Path
) -> None:
    """The 1.0.x SDK (protocol version 2) has no decoder for EVENT (type 12): one would make it throw, drop
    its connection and reconnect 3 s later. A stream to its user, posted to another node, reaches a
    version-5 client on the SDK's node as EVENTs and the SDK not at all: it sees the anchor as an ordinary
    message (no stream bits, which it would misread), keeps its one connection and gets what follows."""
    sdk_node, backend_node = roles(cluster)
    await set_token(cluster, sdk_node, "jsdan", "dan-web", 1, 0)
    await set_token(cluster, sdk_node, "jsdan", "dan-app", 0, 1)
    ws_url = f"ws://{cluster.config.node(sdk_node).ws}"

    async def api(path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, answer = await http_json(
            cluster.http(backend_node), "POST", path, body, headers={"token": MANAGER_TOKEN}
        )
        assert status == 200, answer
        return dict(answer)

    async def send(client_msg_no: str, text: str, is_stream: int) -> int:
        payload = json.dumps({"content": text, "type": 1}).encode()
        answer = await api(
            "/message/send",
            {
                "from_uid": "bot",
                "channel_id": "jsdan",
                "channel_type": 1,
                "client_msg_no": client_msg_no,
                "is_stream": is_stream,
                "payload": base64.b64encode(payload).decode(),
            },
        )
        return int(answer["message_id"])

    async with (
        js_sdk(node_binary, ws_url, "jsdan", "dan-web", tmp_path / "sdk.log") as sdk,
        open_client(*cluster.tcp(sdk_node), "jsdan", token="dan-app") as app,
    ):
        await sdk.wait_for("a connection", lambda: sdk.status() == CONNECTED)
        with trio.fail_after(10):  # the backend's node knows where jsdan's two devices are online
            while True:
                status, online = await http_json(
                    cluster.http(backend_node),
                    "POST",
                    "/user/onlinestatus",
                    ["jsdan"],
                    headers={"token": MANAGER_TOKEN},
                )
                if status == 200 and len(online) == 2:
                    break
                await trio.sleep(0.05)
        anchor = await send("stream-1", "", 1)
        await sdk.wait_for("the anchor", received(sdk, anchor))
        assert (await app.recv()).client_msg_no == "stream-1"
        event: dict[str, Any] = {
            "channel_id": "jsdan",
            "channel_type": 1,
            "from_uid": "bot",
            "client_msg_no": "stream-1",
        }
        for i in range(20):
            delta = {"kind": "text", "delta": f"w{i} "}
            await api(
                "/message/event",
                {**event, "event_id": f"d{i}", "event_type": "stream.delta", "payload": delta},
            )
        await api("/message/event", {**event, "event_id": "end", "event_type": "stream.finish"})
        for i in range(21):  # the version-5 client on the same node got them all: they were sent there
            assert (await app.event()).id == ("end" if i == 20 else f"d{i}")
        # An EVENT would show only when the SDK's reconnect timer fires: proving an absence, no condition.
        await trio.sleep(SDK_RECONNECT_DELAY_S + 1)
        after = await send("after-1", "after the stream", 0)
        [message] = await sdk.wait_for("the message after the stream", received(sdk, after))
        assert message["text"] == "after the stream"
        assert sdk.opened() == 1 and DISCONNECTED not in [e["status"] for e in sdk.of("status")]
