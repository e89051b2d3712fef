"""Accuracy benchmark (issue #6): RULER-style synthetic tasks and their metrics. The runner comes next."""
