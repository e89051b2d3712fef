"""Accuracy benchmark: RULER-style synthetic tasks, their metrics, the runner and the reports."""
