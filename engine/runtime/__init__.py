"""The runtime: processes that consume the store and persist what the stages return.

``supervisor`` (the parent process: assignment, restarts, status), ``worker`` (reads buckets a safe delay behind
the clock, runs the stage, checkpoints: emissions, then offsets), ``assign`` (shard ranges per worker, pure) and
``stages`` (the counting stage behind ``--stage count``). May import every layer below (core, store, ingest,
correlate); never the tools or the test support.
"""
