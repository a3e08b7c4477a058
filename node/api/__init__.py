"""The business HTTP API (WuKongIM paths and JSON shapes): the app, request fields, routes per resource."""
