"""Operator tools built on the engine: ``simulate`` (simulated sensors with ground truth), ``verify`` (what was
ingested against what was stored and fused), ``accuracy`` (story accuracy against the simulator's truth),
``tune`` (sizing). May import every layer; the runtime never imports them.
"""
