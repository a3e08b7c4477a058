"""The Raft secret of a node whose config sets no `raft_password`.

PySyncObj without a password unpickles whatever reaches its port, so anyone who can connect runs code in
the node. No node runs that way: a cluster config must name `raft_password` (node/config.py), and a single
node on its defaults uses a random secret generated once and kept in its data dir, readable by its owner
only. The secret never leaves the machine, so such a node cannot be joined by another; a cluster is
configured with a shared `raft_password` instead.
"""

from __future__ import annotations

import os
import secrets

SECRET_FILE = "raft.secret"
SECRET_BYTES = 32


def local_secret(data_dir: str) -> str:
    """The secret in `data_dir`, created (mode 0600) on first use. Refuses a file others can read."""
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, SECRET_FILE)
    try:
        # O_EXCL: two starts racing on one data dir both end up with the one secret that won.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(SECRET_BYTES))
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path}: the Raft secret is readable by others (mode {mode:o}); chmod 600 it")
    with open(path) as src:
        secret = src.read().strip()
    if len(secret) < SECRET_BYTES:
        raise ValueError(f"{path}: the Raft secret is too short; delete the file to make a new one")
    return secret
