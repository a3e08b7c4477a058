"""The PySyncObj state machine, its snapshot serializer, and its one crossing into trio."""
