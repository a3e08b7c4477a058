"""Example handlers shipped with imnode: audit, statistics, percentage rollout.

See the README section "Write a handler".
"""
