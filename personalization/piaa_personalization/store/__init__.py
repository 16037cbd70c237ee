"""The Redis profile store: its key and value format, operator tools and a local redis-server."""
