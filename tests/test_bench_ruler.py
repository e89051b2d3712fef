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


@pytest.mark.parametrize("task", ruler.TASKS)
def test_every_task_has_a_paraphrase_that_rewords_its_question(tokenizer, task):
    sample = ruler.generate(task, tokenizer, 512, seed=1)
    assert sample.paraphrase and sample.paraphrase != sample.question
    assert ruler.UNRELATED not in (sample.question, sample.paraphrase)


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


def test_max_compression_interpolates_between_measured_ratios():
    from service.bench.report import max_compression

    points = [(0.0, 80.0), (0.25, 80.0), (0.5, 76.0), (0.75, 56.0), (0.9, 10.0)]
    assert max_compression(points, 0.10) == pytest.approx(0.5 + (72 - 76) * 0.25 / (56 - 76))  # 0.55
    assert max_compression(points, 0.20) == pytest.approx(0.5 + (64 - 76) * 0.25 / (56 - 76))  # 0.65
    assert max_compression([(0.0, 50.0), (0.5, 50.0), (0.9, 49.0)], 0.10) == 0.9
    assert max_compression([(0.0, 50.0), (0.25, 10.0)], 0.10) == pytest.approx(0.25 * 5 / 40)


def test_report_tables_and_plots(tmp_path):
    from service.bench import report

    rows = []
    for sample in range(3):
        for press, ratio, score in [("none", 0.0, 100), ("snapkv", 0.5, 100 if sample else 0), ("snapkv", 0.9, 0)]:
            rows.append({"task": "niah_single_1", "press": press, "ratio": ratio, "score": float(score),
                         "sample": sample, "bytes_int8": int(1e5 * (1 - ratio)),
                         "bytes_float16": int(2e5 * (1 - ratio)), "length": 100})
    text = report.table(rows)
    assert "| snapkv | 0.50 | 66.7 | 66.7 ± " in text and "(n=3)" in text
    assert "baseline solves" not in text  # every task is solved: no extra column
    # 90 and 80 crossed between ratio 0 (100) and 0.5 (66.7); float16 bytes/token interpolated at each
    assert "| snapkv | 0.15 | 1,700 | 0.30 | 1,400 |" in text
    unsolved = [{**r, "task": "vt", "score": 0.0} for r in rows]
    text = report.table(rows + unsolved)
    assert "average over the 1 tasks the baseline solves |" in text
    assert "| snapkv | 0.50 | 66.7 | 0.0 | 33.3 ± " in text and text.split("\n")[3].endswith(" 66.7 ± 65.3 |")
    coded = [{**r, "press": r["press"] + "@int4", "bytes_stored": int(6e4 * (1 - r["ratio"]))} for r in rows]
    assert "| snapkv@int4 | 0.15 | 510 | 0.30 | 420 |" in report.table(rows + coded)  # the row's own codec's bytes
    paths = report.plots(rows, tmp_path)
    assert all(p.exists() and p.stat().st_size > 1000 for p in paths)


def test_plot_styles_differ_per_curve():
    """Every curve of a plot has its own colour and marker (matplotlib's cycle repeats after 10: the
    2k plot drew TOVA and ExpectedAttention in the same blue), and a default press keeps its colour
    whatever else is plotted."""
    from service.bench import report

    presses = list(report.KNOWN) + ["kvcompose@int4", "kvcompose@int8", "snapkv@int2", "x", "y"]
    style = report.styles(presses)
    assert len(presses) == len(report.PALETTE) and len({s["color"] for s in style.values()}) == len(presses)
    more = report.styles(presses + ["z"])  # past the palette: a colour again, never with the same marker
    assert len({(s["color"], s["marker"]) for s in more.values()}) == len(presses) + 1
    assert report.styles(["tova", "kvcompose@int4"])["tova"] == style["tova"]
    codecs = report.styles(["kvcompose", "kvcompose@int4", "kvcompose@int8"])
    assert len({s["color"] for s in codecs.values()}) == 3
