"""Storyline: stream processing with ScyllaDB as both the event store and the queue."""

__version__ = "0.1.0"
