"""Plugins for tests/test_plugins.py: good ones, failing ones, and ones that must stop a node's start.

They are named by `module:object` in test configs and entry points, exactly as a user's plugins would be.
"""
