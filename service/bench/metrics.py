"""RULER's scoring: ``string_match_all`` (most tasks) and ``string_match_part`` (QA), in percent.

A reference counts as found when it occurs in the prediction, case-insensitively (as RULER does).
"""

from __future__ import annotations

from collections.abc import Sequence


def _found(prediction: str, reference: str) -> bool:
    return reference.lower() in prediction.lower()


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over samples of the fraction of that sample's references found, x100."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("need as many predictions as reference lists, at least one")
    return 100 * sum(sum(_found(p, r) for r in refs) / len(refs) for p, refs in zip(predictions, references)) \
        / len(predictions)


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over samples of 1 if any of that sample's references is found, x100."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("need as many predictions as reference lists, at least one")
    return 100 * sum(any(_found(p, r) for r in refs) for p, refs in zip(predictions, references)) / len(predictions)


def metric_for(task: str):
    return string_match_part if task.startswith("qa_") else string_match_all
