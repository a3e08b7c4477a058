"""TLS contexts: the certificate a node's TLS listeners present, and the CAs its own HTTPS clients trust.

The config loader checks only the shape of `[tls]`; the files are read here, when a node is built (or a
command that calls nodes over https starts), so an admin command on a machine without the node's private
key still loads the config. A file that is missing, unreadable or not PEM is a ConfigError naming the key,
raised before any listener opens.
"""

from __future__ import annotations

import ssl

from node.config import Config, ConfigError


def _readable(source: str, key: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{source}: {key}: cannot read {path}: {exc.strerror or exc}") from None


def server_context(config: Config) -> ssl.SSLContext | None:
    """The context of the TCP-TLS and wss listeners (None when `[tls]` has no certificate)."""
    tls = config.tls
    if not tls.cert_file:
        return None
    _readable(config.source, "tls.cert_file", tls.cert_file)
    _readable(config.source, "tls.key_file", tls.key_file)
    # TLS 1.2 at least, the module's secure defaults; clients are not asked for certificates.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # An empty password: an encrypted key fails here instead of OpenSSL prompting on a terminal that
        # a node started by `cluster up` does not have.
        context.load_cert_chain(tls.cert_file, tls.key_file, password=b"")
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{config.source}: tls.cert_file, tls.key_file: not a PEM certificate and its matching, "
            f"unencrypted private key ({exc.reason or exc})"
        ) from None
    return context


def client_context(source: str, key: str, ca_file: str) -> ssl.SSLContext:
    """Certificate and host name checks against `ca_file` only, or the system's trust store if empty."""
    if not ca_file:
        return ssl.create_default_context()
    _readable(source, key, ca_file)
    try:
        return ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as exc:
        reason = exc.reason or exc
        raise ConfigError(f"{source}: {key}: {ca_file} holds no PEM certificate ({reason})") from None
