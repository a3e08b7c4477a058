"""Channel type 11 (agent) end to end on one real node (real PySyncObj, LMDB, sockets; the webhook receiver
is a real HTTP server on 127.0.0.1): a user asks an agent over the binary protocol, the agent's backend
answers with a stream on the same channel type, the user's devices see the answer and its events, and
nobody gets msg.offline for it (WuKongIM's `event_distribute.go`)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import trio

from node.client import open_client
from node.config import WebhookSettings
from node.wire.protocol import Reason
from raft.commands import CHANNEL_AGENT
from tests.cluster.test_webhooks import Receiver
from tests.conftest import RunningNode, http_json, running_node, single_node_config, wait_for

ANSWER = ["Agents ", "answer ", "token ", "by ", "token."]
TEXT = base64.b64encode(b'{"type":1,"content":"hi"}').decode()


async def post(node: RunningNode, path: str, body: Any) -> Any:
    status, answer = await http_json(node.http, "POST", path, body)
    assert status == 200, (path, body, status, answer)
    return answer


def event(event_id: str, event_type: str, payload: Any) -> dict[str, Any]:
    # The backend names the channel as it sent the anchor: from the agent to the user.
    return {
        "channel_id": "alice",
        "channel_type": CHANNEL_AGENT,
        "from_uid": "bot",
        "client_msg_no": "answer-1",
        "event_id": event_id,
        "event_type": event_type,
        "payload": payload,
    }


async def test_a_user_asks_an_agent_and_the_streamed_answer_reaches_every_device_of_the_user(
    tmp_path: Path,
) -> None:
    receiver = Receiver()
    hook = WebhookSettings(url=receiver.url, backoff_initial_s=0.05, backoff_max_s=0.2, attempts=1000)

    def offline_ids() -> set[int]:
        return {body["message_id"] for e, body, _ in receiver.posts if e == "msg.offline"}

    async with trio.open_nursery() as nursery:
        await receiver.up(nursery)
        async with running_node(single_node_config(tmp_path / "n1", webhook=hook)) as node:
            # The leader publishes the webhook settings first: a message before them writes no event.
            marker = await post(
                node,
                "/message/send",
                {"from_uid": "x", "channel_id": "y", "channel_type": 1, "payload": TEXT},
            )
            await wait_for(lambda: marker["message_id"] in offline_ids(), 20, "the settings in force")
            host, port = node.tcp
            # The agent `bot` has no connection: its backend works over HTTP only.
            async with (
                open_client(host, port, "alice", device_flag=0) as phone,
                open_client(host, port, "alice", device_flag=1) as web,
            ):
                ack = await phone.send("bot", CHANNEL_AGENT, b'{"type":1,"content":"weather?"}')
                assert ack.reason_code == Reason.SUCCESS and ack.message_seq == 1
                echo = await web.recv()  # the user's other device sees the question as sent
                assert (echo.channel_id, echo.channel_type, echo.from_uid) == ("bot", CHANNEL_AGENT, "alice")

                anchor = await post(
                    node,
                    "/message/send",
                    {
                        "from_uid": "bot",
                        "channel_id": "alice",
                        "channel_type": CHANNEL_AGENT,
                        "client_msg_no": "answer-1",
                        "is_stream": 1,
                        "payload": base64.b64encode(b'{"type":1,"content":""}').decode(),
                    },
                )
                for device in (phone, web):
                    recv = await device.recv()
                    # WuKongIM's RECV keeps the channel_id the sender addressed on an agent channel.
                    assert (recv.channel_id, recv.channel_type, recv.from_uid) == (
                        "alice",
                        CHANNEL_AGENT,
                        "bot",
                    )
                    assert recv.message_id == anchor["message_id"] and recv.client_msg_no == "answer-1"

                for i, word in enumerate(ANSWER):
                    answer = await post(
                        node,
                        "/message/event",
                        event(f"d{i}", "stream.delta", {"kind": "text", "delta": word}),
                    )
                    assert answer["data"]["stream_status"] == "open", answer
                finish = await post(node, "/message/event", event("f", "stream.finish", {"reason": "done"}))
                assert finish["data"]["stream_status"] == "closed"
                for device in (phone, web):
                    for i, word in enumerate(ANSWER):
                        got = await device.event()
                        data = json.loads(got.data)
                        assert (got.id, data["payload"]["delta"]) == (f"d{i}", word)
                        assert (data["channel_id"], data["channel_type"]) == ("alice", CHANNEL_AGENT)
                        assert data["message_id"] == anchor["message_id"]
                    got = await device.event()
                    text = json.loads(got.data)["payload"]["snapshot"]["text"]
                    assert (got.type, text) == ("stream.finish", "".join(ANSWER))

            # The question and the answer are two channels (WuKongIM's `uid@agent` and `agent@uid`), each
            # in both parties' conversations under its stored id.
            rows = await post(node, "/conversation/sync", {"uid": "alice", "msg_count": 1})
            assert {(r["channel_id"], r["channel_type"]) for r in rows} == {
                ("alice@bot", CHANNEL_AGENT),
                ("bot@alice", CHANNEL_AGENT),
            }
            synced = await post(
                node,
                "/channel/messagesync",
                {"login_uid": "alice", "channel_id": "bot@alice", "channel_type": CHANNEL_AGENT, "limit": 10},
            )
            [streamed] = synced["messages"]
            assert streamed["from_uid"] == "bot" and streamed["end"] == 1
            assert base64.b64decode(streamed["stream_data"]).decode() == "".join(ANSWER)
            asked = await post(
                node,
                "/channel/messagesync",
                {"login_uid": "alice", "channel_id": "alice@bot", "channel_type": CHANNEL_AGENT, "limit": 10},
            )
            assert [m["message_seq"] for m in asked["messages"]] == [1]

            # msg.notify for both, as for any stored message; msg.offline for neither, though `bot` was
            # offline throughout. A person message to an offline user after them is the control: the outbox
            # posts in log order, so once its msg.offline is in, theirs would have been too.
            ours = {ack.message_id, anchor["message_id"]}
            await wait_for(lambda: ours <= {m["message_id"] for m in receiver.notified()}, 20, "msg.notify")
            control = await post(
                node,
                "/message/send",
                {"from_uid": "alice", "channel_id": "carol", "channel_type": 1, "payload": TEXT},
            )
            await wait_for(lambda: control["message_id"] in offline_ids(), 20, "the control's msg.offline")
            assert not ours & offline_ids()
        nursery.cancel_scope.cancel()
