"""``kvcompose bench gpu --tiny``: the device benchmark's every row, rehearsed on the CPU with tiny configs."""

import json

from service.bench import gpu
from service.cli import main


def test_tiny_run_measures_every_row_against_its_reference(tmp_path, capsys):
    assert main(["bench", "gpu", "--tiny", "--out-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["row"] for r in results] == [row.name for row in gpu.plan(tiny=True)]
    assert not [r for r in results if "error" in r]
    by = {r["row"]: r for r in results}
    for r in results:
        if r["kind"] == "compress" and r["method"] != "plain":
            assert r["vs_reference"] > 0 and "target" in r
    assert by["compress/kvpress/llama-3.1-8b/128"]["kvcompose_speedup"] > 0
    assert by["decode/b16/full/llama-3.1-8b/128"]["vs_reference"] > 1  # a batch step serves 16 answers
    assert by["decode/b16/full/llama-3.1-8b/128"]["new_tokens"] == gpu.BATCH * gpu.DECODE_TOKENS
    assert by["decode/b1/kvcompose/qwen3-8b/256"]["vs_full"] > 0
    assert all(by[f"needle/{r:g}/smollm2-135m/400"]["needle"] for r in (0.5, 0.75))
    table = (tmp_path / "gpu.md").read_text()
    assert "| compress/kvcompose/qwen3-8b/256 |" in table and "CPU" in table
    assert "| decode/b16/full/qwen3-8b/128 |" in capsys.readouterr().out


def test_a_slow_or_failing_row_becomes_an_error_row_and_the_run_goes_on():
    rows = gpu.plan(tiny=True, needle=False, shapes=("qwen3-8b",))[:2]
    timed_out = gpu.run(rows, "cpu", "float32", row_limit_s=0.0, budget_s=60, tiny=True, log=lambda *a, **k: None)
    assert [r["row"] for r in timed_out] == [row.name for row in rows]
    assert all("Cancelled" in r["error"] for r in timed_out)
    unknown = gpu.run([gpu.Row("compress", "qwen3-8b", "nosuchpress", 64), rows[0]], "cpu", "float32", 60, 60,
                      tiny=True, log=lambda *a, **k: None)
    assert "KeyError" in unknown[0]["error"] and "error" not in unknown[1]
    spent = gpu.run(rows, "cpu", "float32", 60, budget_s=0, tiny=True, log=lambda *a, **k: None)
    assert all(r["error"].startswith("not run") for r in spent)
