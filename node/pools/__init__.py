"""The event pools (user, channel, pusher) on the event bus, and the stream of committed entries."""
