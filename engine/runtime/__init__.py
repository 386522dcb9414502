"""The runtime: processes that consume the store and persist what the stages return.

``supervisor`` (the parent process: assignment, restarts, drains), ``worker`` (reads buckets a safe delay behind
the clock, runs the stage, checkpoints: emissions, then offsets), ``assign`` (shard ranges per worker, pure),
``settings`` (each component's part of the config; the store and stage factories a worker process builds from),
``stages`` (the ``--stage`` factories: stories, count), ``metrics`` (counters added up across worker restarts,
the Prometheus exposition and its HTTP endpoint) and ``status`` (the status line and JSON lines of ``run``).
May import every layer below (core, store, ingest, correlate); never the tools or the test support.
"""
