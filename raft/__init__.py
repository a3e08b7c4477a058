"""The PySyncObj state machine and its trio bridge.

PySyncObj's tcp_connection imports its Windows shim, which replaces `socket.inet_ntop` process-wide with a
function that raises TypeError on every other platform. Importing it through this package puts the C
function back, so nothing else in a node (or its tests) inherits the breakage.
"""

import _socket
import socket

import pysyncobj.tcp_connection  # noqa: F401 - imported for its side effect, undone below

socket.inet_ntop = _socket.inet_ntop
