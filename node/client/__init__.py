"""imnode's own WuKongIM client on trio (client.py); it shares wire and transports with the gateway."""

from node.client.client import Client, ClientError, ClientStatistics, ConnectRefused, connect, open_client

__all__ = ["Client", "ClientError", "ClientStatistics", "ConnectRefused", "connect", "open_client"]
