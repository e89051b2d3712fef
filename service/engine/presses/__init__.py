"""Scoring and eviction: kvpress presses built from JSON specs, and the project's KVCompose."""

from service.engine.presses.registry import PressSpecError, build, canonical, presses_in

__all__ = ["PressSpecError", "build", "canonical", "presses_in"]
