"""A plugin module that cannot be imported: the name it imports does not exist."""

from __future__ import annotations

from node.plugins import no_such_helper  # type: ignore[attr-defined]

thing = no_such_helper
