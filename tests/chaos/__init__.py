"""Fault injection: the harness and the history checker (issue 6)."""
