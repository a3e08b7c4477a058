"""Operator tools: the `imnode` command line, cluster process helpers, the load generator.

The server never imports this package (tests/test_layers.py checks it)."""
