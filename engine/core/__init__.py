"""The ground layer: what every other layer shares and nothing above it defines.

Configuration (``config``: loading, validation and the per-component parts), errors (one root exception,
retriable errors marked), clocks, the records that cross the seams (``records``: an event as the store keeps it,
a story revision, offsets, dead letters), the canonical event's wire form (``event``), and the stage protocol
with its batch and emission types (``stage``). Imports nothing of the engine outside ``engine.core``.
"""
