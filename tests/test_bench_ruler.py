"""The RULER-style generator (answers present, seeds reproduce, lengths on target) and the metrics."""

import pytest

from service.bench import metrics, ruler


@pytest.mark.parametrize("task", ruler.TASKS)
def test_samples_hit_the_length_contain_their_answers_and_reproduce(tokenizer, task):
    a = ruler.generate(task, tokenizer, 2048, seed=1)
    tokens = len(tokenizer.encode(a.context, add_special_tokens=False))
    assert 0.99 * 2048 <= tokens <= 2048 and a.context_tokens == tokens
    assert a.answers and all(ans in a.context for ans in a.answers)
    assert ruler.generate(task, tokenizer, 2048, seed=1) == a
    assert ruler.generate(task, tokenizer, 2048, seed=2).context != a.context


def test_aggregation_answers_are_really_the_most_frequent(tokenizer):
    cwe = ruler.generate("cwe", tokenizer, 2048, seed=3)
    listed = [line.split(". ", 1)[1] for line in cwe.context.splitlines() if ". " in line and line[0].isdigit()]
    counts = {w: listed.count(w) for w in set(listed)}
    others = [c for w, c in counts.items() if w not in cwe.answers]
    assert len(cwe.answers) == 10 and min(counts[w] for w in cwe.answers) > max(others)
    fwe = ruler.generate("fwe", tokenizer, 2048, seed=3)
    words = fwe.context.split("coded words. ", 1)[1].strip().split(" .... ")
    top = sorted(set(words), key=words.count, reverse=True)[:3]
    assert [words.count(w) for w in top] == [words.count(w) for w in fwe.answers]


def test_unknown_task_is_refused(tokenizer):
    with pytest.raises(ValueError, match="unknown task 'niah'"):
        ruler.generate("niah", tokenizer, 1024, seed=0)


def test_string_match_all_and_part_on_hand_made_cases():
    preds = ["The numbers are 123 and 456.", "only 123", "nothing"]
    refs = [["123", "456"], ["123", "456"], ["789"]]
    assert metrics.string_match_all(preds, refs) == pytest.approx(100 * (1 + 0.5 + 0) / 3)
    assert metrics.string_match_part(preds, refs) == pytest.approx(100 * 2 / 3)
    assert metrics.string_match_all(["ABC-def"], [["abc-DEF"]]) == 100.0  # case-insensitive
    assert metrics.metric_for("qa_2") is metrics.string_match_part
    assert metrics.metric_for("niah_multikey_3") is metrics.string_match_all
    with pytest.raises(ValueError):
        metrics.string_match_all(["a"], [])
