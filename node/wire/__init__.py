"""The WuKongIM binary protocol: frames <-> frozen packets, and the payload crypto.

Imports nothing of ours (tests/test_layers.py checks it)."""
