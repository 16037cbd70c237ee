"""The rating history: a Delta Lake table of every acknowledged rating (table.py), the Redis outbox
the append script feeds (outbox.py) and the writer that drains one into the other (writer.py).
Design: docs/history.md."""
