"""Ingest: from sensor input to stored events.

``canonical`` validates and normalizes the JSON input form into the canonical event; ``network_identity`` is
the direction-independent identity of a network connection (5-tuple flow key, Community ID); ``producer``
writes events durably into the store (``Producer``, the file ``Ingestor``, dead letters, redrive). May import
``engine.core`` and ``engine.store``; never the runtime, the tools or correlation.
"""
