"""A node's data dir (store with login tokens, Raft journal, secret) is its owner's alone, whatever the umask:
a real `imnode node start` process started under umask 022 creates everything 0700 / 0600, tightens what an
older version left readable, and refuses a data dir others can write."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from node.client import open_client
from node.datadir import DataDirError, secure
from node.wire.protocol import Reason
from tests.conftest import NodeProcess, http_json, write_single_node_toml

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual login umask, inherited by the node process the test starts."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def modes(top: Path) -> dict[str, int]:
    """Every folder and file under `top` (itself included), relative path -> permission bits."""
    found = {".": stat.S_IMODE(top.lstat().st_mode)}
    for root, dirs, files in os.walk(top):
        for name in (*dirs, *files):
            path = Path(root) / name
            found[str(path.relative_to(top))] = stat.S_IMODE(path.lstat().st_mode)
    return found


async def test_a_node_started_under_umask_022_keeps_its_data_dir_private(
    tmp_path: Path, umask_022: None
) -> None:
    created = tmp_path / "created"  # the node creates this folder and everything in it
    data_dir = created / "n1"
    config_path = tmp_path / "node.toml"
    ports = write_single_node_toml(config_path, data_dir)
    node = NodeProcess(config_path, tmp_path / "node.log")
    http = f"http://127.0.0.1:{ports['http']}"
    try:
        await trio.to_thread.run_sync(node.start)
        # A login token in the store and a message in the journal, as on any used node.
        status, body = await http_json(http, "POST", "/user/token", {"uid": "alice", "token": "secret-token"})
        assert status == 200, body
        async with open_client("127.0.0.1", ports["tcp"], "bob") as bob:
            assert (await bob.send("alice", 1, b"hi")).reason_code == Reason.SUCCESS
        found = modes(created)
        for expected in ("n1/store/data.mdb", "n1/raft/raft.journal", "n1/raft/raft.secret"):
            assert expected in found, sorted(found)
        loose = {path: f"{mode:o}" for path, mode in found.items() if mode & 0o077}
        assert loose == {}, "readable or writable by other users"
        assert all(mode == 0o700 for path, mode in found.items() if (created / path).is_dir())

        # An older node left its files readable: the next start takes group and other bits away.
        assert node.terminate() == 0
        os.chmod(data_dir, 0o755)
        os.chmod(data_dir / "store", 0o755)
        os.chmod(data_dir / "store" / "data.mdb", 0o644)
        node.log_path.write_text("")  # start waits for a new "listening" line
        await trio.to_thread.run_sync(node.start)
        found = modes(created)
        assert {p: f"{m:o}" for p, m in found.items() if m & 0o077} == {}
        assert found["n1/store/data.mdb"] == 0o600 and found["n1"] == 0o700
        assert node.terminate() == 0

        # A data dir others can write is refused, naming it; nothing in it is touched.
        os.chmod(data_dir / "raft", 0o777)
        node.log_path.write_text("")
        with pytest.raises(AssertionError, match="node exited early"):
            await trio.to_thread.run_sync(node.start)
        assert node.proc is not None and node.proc.wait(timeout=10) == 2
        log = node.log_path.read_text()
        assert f"{data_dir / 'raft'}: other users can write it (mode 777)" in log, log
        assert stat.S_IMODE((data_dir / "raft").stat().st_mode) == 0o777
    finally:
        node.stop()


def test_secure_refuses_a_writable_file_and_never_follows_a_symbolic_link(tmp_path: Path) -> None:
    data = tmp_path / "data"
    secure(str(data))
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    (data / "store").mkdir()
    (data / "store" / "data.mdb").write_bytes(b"x")
    os.chmod(data / "store" / "data.mdb", 0o666)
    with pytest.raises(DataDirError, match=r"data\.mdb: other users can write it"):
        secure(str(data))
    os.chmod(data / "store" / "data.mdb", 0o640)
    # A symbolic link is neither followed nor changed (its target may be anything, anywhere).
    outside = tmp_path / "outside"
    outside.write_text("not the node's")
    os.chmod(outside, 0o644)
    (data / "link").symlink_to(outside)
    secure(str(data))
    assert stat.S_IMODE((data / "store" / "data.mdb").stat().st_mode) == 0o600
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644
