"""``kvcompose bench perf``'s parts on the tiny model: every row runs in its own process, every
repeat of every row is recorded, and each row is divided by its reference from the same run."""

from __future__ import annotations

import csv

from service.bench import perf


def test_perf_runs_every_row_against_its_reference(tiny_model_dir, tmp_path):
    cases = perf.plan([96], [1], kvpress_max_tokens=0, parts={"compress", "ttft", "fetch", "reuse"},
                      reuse_tokens=256)
    assert [c.name for c in cases] == ["compress/plain/96", "compress/kvcompose/96", "compress/kvcompose-1pass/96",
                                       "compress/kvcompose-compactor/96", "ttft/prefill/96", "ttft/reuse/96",
                                       "fetch/redis/1", "fetch/grpc/1", "fetch/grant/1", "reuse/llama-3.1-8b/256"]
    other = perf.plan([96], [1], kvpress_max_tokens=96, parts={"compress"}, ratios=(0.5, 0.9))
    assert [c.name for c in other] == ["compress/plain/96", "compress/kvcompose/96", "compress/kvcompose-1pass/96",
                                       "compress/kvcompose-compactor/96", "compress/kvpress/96",
                                       "compress/kvcompose@0.9/96", "compress/kvcompose-1pass@0.9/96",
                                       "compress/kvcompose-compactor@0.9/96", "compress/kvpress@0.9/96"]
    results = perf.run(cases, 2, str(tiny_model_dir), tmp_path / "work", log=lambda *a, **k: None)
    assert [r["case"] for r in results[:10]] == [c.name for c in cases]  # interleaved: all rows, then again
    assert len(results) == 2 * len(cases) + 4  # + one memory run per compress row
    rows = {r["case"]: r for r in perf.summarize(cases, results)}
    plain, kvc = rows["compress/plain/96"], rows["compress/kvcompose/96"]
    assert kvc["ratio"] == kvc["seconds"] / plain["seconds"] and kvc["runs"] == 2
    assert kvc["bytes_per_token_float16"] < 0.6 * plain["bytes_per_token_float16"]  # ratio 0.5 and a header
    assert plain["peak_extra_mib"] > 0 and kvc["peak_extra_vs_fp16_kv"] > 0
    reuse = rows["ttft/reuse/96"]
    assert reuse["ttft_s"] >= reuse["fetch_s"] + reuse["load_s"] and reuse["decode_tok_s"] > 0
    limit = rows["fetch/redis/1"]
    for run in (r for r in results if r["case"] == "fetch/redis/1"):  # each run: the best way of reading
        assert run["mib_s"] == max(run[f"{way}_mib_s"] for way in ("get", "mget8", "mget16", "mget64"))
    assert limit["ratio"] is None
    for method in ("grpc", "grant"):  # read and verified (a bad read raises)
        assert rows[f"fetch/{method}/1"]["ratio"] == rows[f"fetch/{method}/1"]["mib_s"] / limit["mib_s"]
    reuse = rows["reuse/llama-3.1-8b/256"]
    assert reuse["reuse_s"] == reuse["fetch_s"] + reuse["decode_s"] and reuse["mib"] > 256 * 0.25 * 64 * 1024 / 2**20
    assert reuse["ratio"] is None  # the H200's prefill, the reference, was measured at 32,768 tokens only
    csv_path, md = perf.write(results, list(rows.values()), tmp_path / "out", perf.machine())
    assert len(list(csv.DictReader(open(csv_path)))) == len(results)
    assert "| fetch/grpc/1 | 2 |" in md.read_text() and "/ redis limit" in md.read_text()
