"""The work floor of one person message: the CPU each step of the send path costs when run alone.

`python -m node.tools.floor` runs every step the cluster does for one acknowledged and delivered person
message (200-byte payload, encryption on, entries of `--per-entry` messages, three nodes) in a tight loop,
with the project's own functions and a real LMDB store, and prints CPU µs per message per step and their
sum. What `imnode bench` measures above this sum is the cost of moving the message between steps: task
switches, queues, socket calls, PySyncObj's ticks and the GIL. The closing note of the send-path issue
reads the two side by side.
"""

from __future__ import annotations

import argparse
import pickle
import tempfile
import time
from collections.abc import Callable

from node.wire.crypto import Session, generate_keypair, msg_key_matches, random_salt
from node.wire.protocol import LATEST_VERSION, FrameDecoder, Recv, Recvack, Send, Sendack, encode
from raft.apply import Result, apply_ops
from raft.commands import CHANNEL_PERSON, Op, decode_entry, encode_entry, person_channel_id, send_op
from raft.permissions import send_permission
from raft.transport import FrameOpener, FrameSealer, session_keys
from storage.store import Store

NODES = 3


def _session() -> Session:
    server_key, _server_public = generate_keypair()
    _client_key, client_public = generate_keypair()
    return Session.from_keys(server_key, client_public, random_salt())


def _cpu_us(step: Callable[[], object], rounds: int, per_round: int) -> float:
    """CPU µs per message of `step`, which handles `per_round` messages."""
    step()  # warm up (first LMDB pages, caches)
    started = time.process_time()
    for _ in range(rounds):
        step()
    return (time.process_time() - started) / (rounds * per_round) * 1e6


def measure(rounds: int, per_entry: int) -> dict[str, float]:
    session = _session()
    payload = b"x" * 200
    wire_payload = session.encrypt(payload)
    cid = person_channel_id("alice", "bob")
    sends = [
        Send(
            setting=0,
            client_seq=i,
            client_msg_no=f"cmn-{i}",
            channel_id="bob",
            channel_type=CHANNEL_PERSON,
            payload=wire_payload,
            msg_key=session.send_msg_key(i, f"cmn-{i}", "bob", CHANNEL_PERSON, wire_payload),
        )
        for i in range(per_entry)
    ]
    frames = b"".join(encode(s, LATEST_VERSION) for s in sends)
    recvack_frames = b"".join(
        encode(Recvack(message_id=i, message_seq=i), LATEST_VERSION) for i in range(per_entry)
    )
    counter = iter(range(1 << 62))

    def ops() -> list[Op]:
        return [
            send_op(
                channel_id=cid,
                channel_type=CHANNEL_PERSON,
                sender="alice",
                receiver="bob",
                client_msg_no=f"cmn-{next(counter)}",
                message_id=next(counter),
                timestamp=1_800_000_000,
                setting=0,
                payload=payload,
            )
            for _ in range(per_entry)
        ]

    def decode_sends() -> None:
        decoder = FrameDecoder()
        decoder.feed(frames)
        while decoder.next_packet() is not None:
            pass

    def verify_and_decrypt() -> None:
        for s in sends:
            expected = session.send_msg_key(
                s.client_seq, s.client_msg_no, s.channel_id, s.channel_type, s.payload
            )
            assert msg_key_matches(expected, s.msg_key)
            session.decrypt(s.payload)

    entry = encode_entry(ops())
    # A command as PySyncObj writes it: its type byte, then the pickled call (protocol 5, as imnode sets).
    command = b"\x00" + pickle.dumps((0, (entry,)), protocol=5)
    raft_message = {"type": "append_entries", "term": 1, "commit_index": 1, "entries": [(command, 2, 1)]}
    # imnode's Raft transport (raft/transport.py): cbor2 frames under AES-GCM, one session per follower.
    to_follower, to_leader = session_keys(b"a cluster secret of 32 bytes....", b"i" * 32, b"r" * 32)
    links = [
        (FrameSealer(to_follower), FrameOpener(to_follower), FrameSealer(to_leader), FrameOpener(to_leader))
        for _ in range(NODES - 1)
    ]

    def raft_transport() -> None:
        # The leader seals one append_entries per follower; each follower opens it and answers.
        for leader_out, follower_in, follower_out, leader_in in links:
            follower_in.open(leader_out.seal(raft_message)[4:])
            reply = {"type": "next_node_idx", "next_node_idx": 3, "reset": False, "success": True, "term": 1}
            leader_in.open(follower_out.seal(reply)[4:])

    results: list[Result] = []
    with tempfile.TemporaryDirectory() as folder:
        stores = [Store(f"{folder}/n{i}") for i in range(NODES)]
        index = iter(range(1, 1 << 62))

        def apply_everywhere() -> None:
            data = encode_entry(ops())
            at = next(index)
            for store in stores:
                with store.write() as txn:
                    results[:] = apply_ops(txn, decode_entry(data), at)
                    txn.set_applied_index(at)

        def permission() -> None:
            for _ in range(per_entry):
                with stores[0].read() as txn:
                    send_permission(txn, cid, CHANNEL_PERSON, "alice", "bob")

        figures = {
            "SEND frames decoded": _cpu_us(decode_sends, rounds, per_entry),
            "SEND msg_key checked, payload decrypted": _cpu_us(verify_and_decrypt, rounds, per_entry),
            "permission read (one per send)": _cpu_us(permission, rounds, per_entry),
            "op built and checked, entry encoded": _cpu_us(lambda: encode_entry(ops()), rounds, per_entry),
            "Raft transport (2 followers, AES-GCM frames)": _cpu_us(raft_transport, rounds, per_entry),
            f"apply on {NODES} nodes (one txn per entry)": _cpu_us(apply_everywhere, rounds, per_entry),
        }
        for store in stores:
            store.close()
    result = results[0]

    def sendack() -> None:
        for i in range(per_entry):
            encode(Sendack(result["mid"], i, result["seq"], 0), LATEST_VERSION)

    def recv() -> None:
        for i in range(per_entry):
            encrypted = session.encrypt(payload)
            key = session.recv_msg_key(
                result["mid"], result["seq"], f"cmn-{i}", 1, "alice", "alice", 1, encrypted
            )
            encode(
                Recv(
                    setting=0,
                    msg_key=key,
                    from_uid="alice",
                    channel_id="alice",
                    channel_type=CHANNEL_PERSON,
                    client_msg_no=f"cmn-{i}",
                    message_id=result["mid"],
                    message_seq=result["seq"],
                    timestamp=1_800_000_000,
                    payload=encrypted,
                ),
                LATEST_VERSION,
            )

    def decode_recvacks() -> None:
        decoder = FrameDecoder()
        decoder.feed(recvack_frames)
        while decoder.next_packet() is not None:
            pass

    figures["SENDACK encoded"] = _cpu_us(sendack, rounds, per_entry)
    figures["RECV encrypted, signed, encoded"] = _cpu_us(recv, rounds, per_entry)
    figures["RECVACK decoded"] = _cpu_us(decode_recvacks, rounds, per_entry)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.tools.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300, help="entries per step (default 300)")
    parser.add_argument("--per-entry", type=int, default=10, help="messages per Raft entry (default 10)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.per_entry < 1:
        parser.error("--rounds and --per-entry must be at least 1")
    figures = measure(args.rounds, args.per_entry)
    width = max(map(len, figures))
    for name, us in figures.items():
        print(f"{name:<{width}}  {us:8.1f} µs")
    print(f"{'sum: the work floor per message':<{width}}  {sum(figures.values()):8.1f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
