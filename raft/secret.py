"""The cluster secret: random, kept in a file readable by its owner only.

It authenticates Raft traffic (raft/transport) and, in node/, every node-to-node call. A cluster config
names a shared secret file (`imnode cluster up` creates it once; the README says how to carry it to other
machines) or the secret itself; a single node on its defaults uses one generated in its own data dir, which
never leaves the machine (such a node cannot be joined by another).
"""

from __future__ import annotations

import os
import secrets

SECRET_FILE = "raft.secret"
SECRET_BYTES = 32
# Shorter than this a secret can be guessed offline from one captured handshake.
SECRET_MIN_BYTES = 16


class SecretError(Exception):
    """The secret file is missing, unsafe or unusable; the message says what to do."""


def create_secret_file(path: str) -> bool:
    """Write a new random secret to `path` (mode 0600) unless a file is there; True if one was written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        # O_EXCL: two starts racing on one path both end up with the one secret that won.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(SECRET_BYTES) + "\n")
    return True


def read_secret_file(path: str) -> str:
    """The secret in `path`. Refuses a missing file, one others can read, and a short secret."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        raise SecretError(f"{path}: no cluster secret file") from None
    if mode & 0o077:
        raise SecretError(f"{path}: the cluster secret is readable by others (mode {mode:o}); chmod 600 it")
    with open(path) as src:
        secret = src.read().strip()
    if len(secret.encode()) < SECRET_MIN_BYTES:
        raise SecretError(f"{path}: the secret is shorter than {SECRET_MIN_BYTES} bytes; make a new file")
    return secret


def local_secret(data_dir: str) -> str:
    """The secret of a node alone, in its data dir, created on first use."""
    path = os.path.join(data_dir, SECRET_FILE)
    create_secret_file(path)
    return read_secret_file(path)
