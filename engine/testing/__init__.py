"""Test support shipped with the engine, for its tests, the chaos suite and the benchmarks: the recording stage
(:mod:`.recording`), the link oracle (:mod:`.baseline`), the in-process pipeline (:mod:`.pipeline`) and an
in-memory store. The engine itself never imports this package; it may import any layer."""
