"""A node's data directory is its owner's alone: folders 0700, files 0600, whatever the umask.

It holds the LMDB store (login tokens in clear), the Raft journal and dump (every message) and the Raft
secret. `imnode node start` sets the process's umask to 0o077 (`PRIVATE_UMASK`) before anything is
created, so LMDB's and PySyncObj's files are born private; `secure` tightens what an older version left
readable, and refuses a directory others can write: someone who can write there can replace the journal or
the store (and so what the node applies), so nothing in it can be trusted, and only the operator can tell
whether it was touched.
"""

from __future__ import annotations

import os
import stat

PRIVATE_UMASK = 0o077
DIR_MODE = 0o700
FILE_MODE = 0o600
# How many entries `secure` looks at: a data dir holds a dozen; a bound all the same (a wrong data_dir
# such as a home directory must not make the start walk a whole disk).
ENTRIES_MAX = 10_000
# Not tightened: a Raft secret others could read may be known already. raft/secret.py refuses it, saying
# what to do, rather than this making it look private again.
KEEP_AS_IS = frozenset({"raft.secret"})


class DataDirError(Exception):
    """The data directory cannot be used safely; the message names the path and what to do."""


def secure(path: str) -> None:
    """Create `path` (0700) if needed; refuse it if others can write it or anything in it; else take away
    every group and other permission bit of it and of what it holds. Symbolic links are not followed."""
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    found: list[tuple[str, os.stat_result]] = [(path, os.lstat(path))]
    for root, dirs, files in os.walk(path):  # never into a symbolic link
        for entry in (*dirs, *files):
            name = os.path.join(root, entry)
            found.append((name, os.lstat(name)))
            if len(found) > ENTRIES_MAX:
                raise DataDirError(
                    f"{path}: holds more than {ENTRIES_MAX} entries: is this a node's data dir? "
                    "(nodes.<id>.data_dir names a folder of its own)"
                )
    uid = os.geteuid()
    for name, info in found:
        if stat.S_ISLNK(info.st_mode):
            continue
        if info.st_uid != uid:
            raise DataDirError(
                f"{name}: owned by uid {info.st_uid}, not by this node's user (uid {uid}); "
                "a node's data dir must be its own"
            )
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise DataDirError(
                f"{name}: other users can write it (mode {stat.S_IMODE(info.st_mode):o}), so its contents "
                f"cannot be trusted; check them, then `chmod -R go-rwx {path}`"
            )
    for name, info in found:
        if stat.S_ISLNK(info.st_mode) or os.path.basename(name) in KEEP_AS_IS:
            continue
        mode = stat.S_IMODE(info.st_mode)
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            os.chmod(name, mode & stat.S_IRWXU)
