"""Where clients come in: TCP and WebSocket listeners, connections, the connection registry, transports."""
