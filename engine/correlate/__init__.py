"""Correlation: fusing events into stories.

:mod:`engine.correlate.link` holds the pure, vectorized link step: which events belong to the same story.
"""
