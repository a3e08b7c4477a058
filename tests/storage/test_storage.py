"""storage/ on real LMDB: key encodings, prefix scans, member indexes, snapshot install, fill limit."""

from __future__ import annotations

import os
import shutil
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

import storage.store as store_module
from storage import keys
from storage.store import DB_NAMES, Store, StoreFull

GROUP = 2
PERSON = 1


@pytest.fixture
def store(tmp_path: os.PathLike[str]) -> Iterator[Store]:
    s = Store(os.path.join(tmp_path, "db"), map_size=64 << 20)
    yield s
    s.close()


def _msg(seq: int, tag: str = "") -> dict[str, object]:
    return {"seq": seq, "tag": tag}


# -- key encodings -------------------------------------------------------------------------------------


def test_member_keys_of_shifted_parts_differ() -> None:
    # Without length prefixes "ab"+"c" and "a"+"bc" would be the same bytes.
    assert keys.member_key(keys.channel_key("ab", GROUP), "c") != keys.member_key(
        keys.channel_key("a", GROUP), "bc"
    )
    assert keys.user_channel_key("ab", keys.channel_key("c", GROUP)) != keys.user_channel_key(
        "a", keys.channel_key("bc", GROUP)
    )
    assert keys.dedup_key(keys.channel_key("g", GROUP), "ab", "c") != keys.dedup_key(
        keys.channel_key("g", GROUP), "a", "bc"
    )


def test_same_id_in_two_channel_types_are_two_channels() -> None:
    assert keys.channel_key("x", PERSON) != keys.channel_key("x", GROUP)
    assert keys.message_key(keys.channel_key("x", PERSON), 1) != keys.message_key(
        keys.channel_key("x", GROUP), 1
    )


def test_channel_key_round_trips() -> None:
    chan = keys.channel_key("grüppe", 7)
    assert keys.split_channel_key(chan + b"tail") == ("grüppe", 7, len(chan))
    assert keys.uid_of_member_key(chan, keys.member_key(chan, "ütf")) == "ütf"
    assert keys.seq_of_message_key(keys.message_key(chan, 2**40 + 3)) == 2**40 + 3


def test_message_keys_sort_numerically() -> None:
    chan = keys.channel_key("g", GROUP)
    seqs = [1, 2, 9, 10, 255, 256, 65536, 2**40]
    assert sorted(keys.message_key(chan, s) for s in reversed(seqs)) == [
        keys.message_key(chan, s) for s in seqs
    ]


def test_part_over_255_bytes_is_refused() -> None:
    assert keys.part("a" * 255)[0] == 255
    with pytest.raises(keys.KeyError_):
        keys.part("a" * 256)
    with pytest.raises(keys.KeyError_):
        keys.part("é" * 128)  # 256 bytes in UTF-8, 128 characters
    with pytest.raises(keys.KeyError_):
        keys.channel_key("g", 256)
    with pytest.raises(keys.KeyError_):
        keys.channel_key("g", -1)


def test_store_refuses_long_part_before_writing(store: Store) -> None:
    chan = keys.channel_key("g", GROUP)
    with pytest.raises(keys.KeyError_), store.write() as txn:
        txn.add_member("subscribers", chan, "u" * 300)
    with store.read() as txn:
        assert txn.members("subscribers", chan) == []


# -- prefix scans ---------------------------------------------------------------------------------------


def test_member_scan_stays_in_its_channel(store: Store) -> None:
    # Neighbours in key order: a shorter id, a longer id sharing the prefix, the same id in another type.
    chans = {
        "a": keys.channel_key("a", GROUP),
        "ab": keys.channel_key("ab", GROUP),
        "a-person": keys.channel_key("a", PERSON),
        "b": keys.channel_key("b", GROUP),
    }
    with store.write() as txn:
        for name, chan in chans.items():
            for db in ("subscribers", "blacklist", "whitelist"):
                txn.add_member(db, chan, f"{name}-1")
                txn.add_member(db, chan, f"{name}-2")
    with store.read() as txn:
        for name, chan in chans.items():
            for db in ("subscribers", "blacklist", "whitelist"):
                assert txn.members(db, chan) == [f"{name}-1", f"{name}-2"]
        assert txn.members("subscribers", keys.channel_key("", GROUP)) == []
        assert txn.members("subscribers", keys.channel_key("a", 3)) == []
        assert txn.members("subscribers", chans["a"], limit=1) == ["a-1"]
        assert txn.has_members("whitelist", chans["ab"])
        assert not txn.has_members("whitelist", keys.channel_key("zz", GROUP))


def test_message_scan_stays_in_its_channel(store: Store) -> None:
    a, ab, a_person = (
        keys.channel_key("a", GROUP),
        keys.channel_key("ab", GROUP),
        keys.channel_key("a", PERSON),
    )
    with store.write() as txn:
        for seq in range(1, 4):
            txn.put_message(a, seq, _msg(seq, "a"))
            txn.put_message(ab, seq, _msg(seq, "ab"))
            txn.put_message(a_person, seq, _msg(seq, "a-person"))
    with store.read() as txn:
        assert [m["tag"] for m in txn.messages(a, 0, 0, 100)] == ["a"] * 3
        assert [m["tag"] for m in txn.messages(ab, 0, 0, 100)] == ["ab"] * 3
        assert [m["tag"] for m in txn.messages(a_person, 0, 0, 100)] == ["a-person"] * 3
        # Past the channel's last message the scan must stop, not run into the next channel.
        assert txn.messages(a, 4, 0, 100) == []
        assert txn.messages(keys.channel_key("aa", GROUP), 0, 0, 100) == []


def test_messages_ranges(store: Store) -> None:
    chan = keys.channel_key("g", GROUP)
    with store.write() as txn:
        for seq in range(1, 11):
            txn.put_message(chan, seq, _msg(seq))

    def seqs(start: int, end: int, limit: int) -> list[int]:
        with store.read() as txn:
            return [m["seq"] for m in txn.messages(chan, start, end, limit)]

    assert seqs(0, 0, 100) == list(range(1, 11))
    assert seqs(3, 5, 100) == [3, 4, 5]
    assert seqs(3, 0, 2) == [3, 4]
    assert seqs(5, 5, 100) == [5]
    assert seqs(6, 5, 100) == []
    assert seqs(9, 0, 100) == [9, 10]
    assert seqs(11, 0, 100) == []
    assert seqs(-5, 2, 100) == [1, 2]
    assert seqs(1, 0, 0) == []
    with store.read() as txn:
        assert txn.message(chan, 4) == _msg(4)
        assert txn.message(chan, 11) is None


def test_delete_messages_leaves_neighbours(store: Store) -> None:
    a, ab = keys.channel_key("a", GROUP), keys.channel_key("ab", GROUP)
    with store.write() as txn:
        for seq in range(1, 4):
            txn.put_message(a, seq, _msg(seq))
            txn.put_message(ab, seq, _msg(seq))
        txn.delete_messages(a)
    with store.read() as txn:
        assert txn.messages(a, 0, 0, 100) == []
        assert len(txn.messages(ab, 0, 0, 100)) == 3


# -- members and the user_channels index ---------------------------------------------------------------


def test_add_and_remove_member_return_whether_anything_changed(store: Store) -> None:
    chan = keys.channel_key("g", GROUP)
    with store.write() as txn:
        assert txn.add_member("subscribers", chan, "u1") is True
        assert txn.add_member("subscribers", chan, "u1") is False
        assert txn.is_member("subscribers", chan, "u1")
        assert txn.remove_member("subscribers", chan, "u1") is True
        assert txn.remove_member("subscribers", chan, "u1") is False
        assert txn.remove_member("blacklist", chan, "never") is False
        assert not txn.is_member("subscribers", chan, "u1")


def test_user_channels_index_follows_subscribers_only(store: Store) -> None:
    g1, g2, p = (
        keys.channel_key("g1", GROUP),
        keys.channel_key("g2", GROUP),
        keys.channel_key("u1@u2", PERSON),
    )
    with store.write() as txn:
        txn.add_member("subscribers", g1, "u1")
        txn.add_member("subscribers", p, "u1")
        txn.add_member("blacklist", g2, "u1")
        txn.add_member("whitelist", g2, "u1")
        # A uid that is a prefix of another must not see the other's channels.
        txn.add_member("subscribers", g2, "u10")
    with store.read() as txn:
        assert sorted(txn.user_channels("u1")) == [("g1", GROUP), ("u1@u2", PERSON)]
        assert txn.user_channels("u10") == [("g2", GROUP)]
        assert txn.user_channels("nobody") == []
    with store.write() as txn:
        txn.remove_member("blacklist", g2, "u1")
        txn.remove_member("subscribers", g1, "u1")
    with store.read() as txn:
        assert txn.user_channels("u1") == [("u1@u2", PERSON)]
    with store.write() as txn:
        txn.clear_members("subscribers", p)
    with store.read() as txn:
        assert txn.user_channels("u1") == []
        assert txn.members("subscribers", p) == []


def test_scan_and_generic_rows(store: Store) -> None:
    with store.write() as txn:
        txn.put("presence", keys.part("u1") + b"n1", {"d": 1})
        txn.put("presence", keys.part("u1") + b"n2", {"d": 2})
        txn.put("presence", keys.part("u10") + b"n1", {"d": 3})
    with store.read() as txn:
        assert [v["d"] for _, v in txn.scan("presence", keys.part("u1"))] == [1, 2]
        assert txn.get("presence", keys.part("u10") + b"n1") == {"d": 3}
    with store.write() as txn:
        assert txn.delete("presence", keys.part("u1") + b"n1") is True
        assert txn.delete("presence", keys.part("u1") + b"n1") is False


def test_online_among_finds_exactly_the_uids_with_a_presence_row(store: Store) -> None:
    with store.write() as txn:
        txn.put("presence", keys.presence_key("u10", 1, 7), {"d": 1})
        txn.put("presence", keys.presence_key("zz", 2, 8), {"d": 2})
    with store.read() as txn:
        # "u1" is a prefix of "u10" as text, not as a length-prefixed key part; "zzz" sorts past the last row.
        assert txn.online_among(["u1", "u10", "zz", "zzz", "a"]) == {"u10", "zz"}
        assert txn.online_among([]) == set()


def test_applied_index_and_meta_survive_reopen(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "db")
    s = Store(path, map_size=16 << 20)
    with s.write() as txn:
        txn.set_applied_index(42)
        txn.set_meta("system_uids", ["sys"])
    s.close()
    s = Store(path, map_size=16 << 20)
    try:
        assert s.applied_index() == 42
        with s.read() as txn:
            assert txn.meta("system_uids") == ["sys"]
            assert txn.meta("schema") == 1
    finally:
        s.close()


# -- snapshot install and the fill limit ----------------------------------------------------------------


def _dump_all(s: Store) -> dict[str, list[tuple[bytes, bytes]]]:
    out: dict[str, list[tuple[bytes, bytes]]] = {}
    with s.env.begin(buffers=False) as txn:
        for name in DB_NAMES:
            out[name] = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=s._dbs[name])]
    return out


def test_install_swaps_in_another_stores_copy(tmp_path: os.PathLike[str]) -> None:
    source = Store(os.path.join(tmp_path, "a"), map_size=16 << 20)
    target = Store(os.path.join(tmp_path, "b"), map_size=16 << 20)
    try:
        chan = keys.channel_key("g", GROUP)
        with source.write() as txn:
            txn.put_channel(chan, {"type": GROUP, "last_seq": 2})
            txn.put_message(chan, 1, _msg(1, "src"))
            txn.put_message(chan, 2, _msg(2, "src"))
            txn.add_member("subscribers", chan, "u1")
            txn.set_applied_index(7)
        with target.write() as txn:
            txn.put_message(keys.channel_key("old", GROUP), 1, _msg(1, "old"))
            txn.set_applied_index(3)

        snap = os.path.join(tmp_path, "snap.mdb")
        with open(snap, "wb") as out:
            source.copy_to_fd(out.fileno())
        assert target.generation == 0
        target.install(snap)

        assert target.generation == 1
        assert not os.path.exists(snap)  # moved into place, not copied
        assert target.applied_index() == 7
        with target.read() as txn:
            assert [m["tag"] for m in txn.messages(chan, 0, 0, 10)] == ["src", "src"]
            assert txn.members("subscribers", chan) == ["u1"]
            assert txn.user_channels("u1") == [("g", GROUP)]
            assert txn.messages(keys.channel_key("old", GROUP), 0, 0, 10) == []
        assert _dump_all(target) == _dump_all(source)
        # The reopened store takes writes as before.
        with target.write() as txn:
            txn.put_message(chan, 3, _msg(3, "after"))
        with target.read() as txn:
            assert txn.message(chan, 3) == _msg(3, "after")
    finally:
        source.close()
        target.close()


def test_check_room_refuses_before_the_map_is_full(tmp_path: os.PathLike[str]) -> None:
    s = Store(os.path.join(tmp_path, "tiny"), map_size=512 << 10, fill_limit=0.8)
    try:
        s.check_room()  # a fresh store has room
        chan = keys.channel_key("g", GROUP)
        blob = b"x" * 1000
        full_at = None
        for seq in range(1, 1000):
            try:
                s.check_room()
            except StoreFull:
                full_at = seq
                break
            with s.write() as txn:
                txn.put_message(chan, seq, {"payload": blob})
        assert full_at is not None, "check_room never refused"
        assert full_at > 100  # it refused because the map filled, not from the start
        used = s.stats()["used_bytes"]
        assert 0.8 * s.map_size < used <= s.map_size
        with s.read() as txn:
            assert len(txn.messages(chan, 0, 0, 10_000)) == full_at - 1
    finally:
        s.close()


def test_grow_doubles_the_map(tmp_path: os.PathLike[str]) -> None:
    s = Store(os.path.join(tmp_path, "g"), map_size=1 << 20)
    try:
        s.grow()
        assert s.map_size == 2 << 20
        assert s.env.info()["map_size"] == 2 << 20
    finally:
        s.close()


def test_env_calls_wait_for_a_snapshot_install_in_progress(tmp_path: os.PathLike[str]) -> None:
    # The node calls sync() from a worker thread every second and check_room() before proposing, while
    # install() runs on PySyncObj's tick thread: close, os.replace, reopen, under _swap_lock and
    # _sync_lock (an fsync holds only the latter, so readers never wait on it).
    s = Store(os.path.join(tmp_path, "db"), map_size=16 << 20)
    closed, release = threading.Event(), threading.Event()

    def installing() -> None:  # the critical section of install(), held open until released
        with s._swap_lock, s._sync_lock:
            s.env.close()
            closed.set()
            release.wait(10)
            s._open()

    outcomes: dict[str, str] = {}

    def call(name: str) -> None:
        try:
            getattr(s, name)()
            outcomes[name] = "ok"
        except Exception as exc:
            outcomes[name] = repr(exc)

    installer = threading.Thread(target=installing)
    installer.start()
    assert closed.wait(10)
    workers = [threading.Thread(target=call, args=(name,)) for name in ("sync", "check_room", "stats")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(0.2)  # a correct store keeps them blocked on the lock; a buggy one fails them at once
    release.set()
    installer.join(10)
    for worker in workers:
        worker.join(10)
    s.close()
    assert outcomes == {"sync": "ok", "check_room": "ok", "stats": "ok"}


def test_check_room_reads_the_disk_once_per_interval(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # statvfs once per proposal was measurable on the send path; the map check stays exact per call.
    calls: list[str] = []
    real = shutil.disk_usage

    def counting(path: str) -> Any:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", counting)
    s = Store(os.path.join(tmp_path, "d"))
    try:
        for _ in range(100):
            s.check_room()
        assert len(calls) == 1
        s._disk = (time.monotonic() - store_module.DISK_CHECK_INTERVAL_S, 0, 0)  # the reading aged out
        s.check_room()
        assert len(calls) == 2
    finally:
        s.close()


def test_check_room_refuses_when_the_disk_reading_is_nearly_full(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(total=100 << 30, free=512))
    s = Store(os.path.join(tmp_path, "f"))
    try:
        for _ in range(3):  # refused on the fresh reading and on the cached one
            with pytest.raises(StoreFull):
                s.check_room()
    finally:
        s.close()
