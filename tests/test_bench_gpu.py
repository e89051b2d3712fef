"""``kvcompose bench gpu --tiny`` and ``--plan``: the device benchmark's every row rehearsed on the CPU with tiny
configs, and its memory plan checked against what tiny runs really hold."""

import json
import weakref

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from service.bench import gpu
from service.cli import main


def quiet(*args, **kwargs) -> None:
    pass


def test_tiny_run_measures_every_row_against_its_reference(tmp_path, capsys):
    assert main(["bench", "gpu", "--tiny", "--out-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["row"] for r in results] == [row.name for row in gpu.plan(tiny=True)]
    assert not [r for r in results if "error" in r or "skipped" in r]
    by = {r["row"]: r for r in results}
    for r in results:
        if r["kind"] == "compress" and r["method"] != "plain":
            assert r["vs_reference"] > 0
        if r["kind"] == "decode":  # the CPU decodes ragged, as the service does there
            assert r["graph"] == "eager (static steps off)" and r["new_tokens"] == r["batch"] * gpu.DECODE_TOKENS
        assert r["plan_peak_gib"] > 0
    assert "two-pass <= 2.2x a plain prefill at 32k: " in by["compress/kvcompose/llama-3.1-8b/256"]["target"]
    assert "64k two-pass with no out-of-memory error: met" in by["compress/kvcompose/llama-3.1-8b/512"]["target"]
    assert "two-pass" not in by["compress/kvcompose/llama-3.1-8b/128"].get("target", "")  # set at 32k only
    assert by["compress/kvpress/llama-3.1-8b/128"]["kvcompose_speedup"] > 0
    assert by["decode/b16/full/llama-3.1-8b/128"]["vs_reference"] > 1  # a batch step serves 16 answers
    assert by["decode/b1/kvcompose/qwen3-8b/256"]["vs_full"] > 0
    assert all(by[f"needle/{r:g}/smollm2-135m/400"]["needle"] for r in (0.5, 0.75))
    table = (tmp_path / "gpu.md").read_text()
    assert "| compress/kvcompose/qwen3-8b/256 |" in table and "CPU" in table
    assert "| decode/b16/full/qwen3-8b/128 |" in capsys.readouterr().out


def test_a_slow_or_failing_row_becomes_an_error_row_and_the_run_goes_on():
    rows = gpu.plan(tiny=True, needle=False, shapes=("qwen3-8b",))[:2]
    timed_out = gpu.run(rows, "cpu", "float32", row_limit_s=0.0, budget_s=60, tiny=True, log=quiet)
    assert [r["row"] for r in timed_out] == [row.name for row in rows]
    assert all("Cancelled" in r["error"] for r in timed_out)
    unknown = gpu.run([gpu.Row("compress", "qwen3-8b", "nosuchpress", 64), rows[0]], "cpu", "float32", 60, 60,
                      tiny=True, log=quiet)
    assert "KeyError" in unknown[0]["error"] and "error" not in unknown[1]
    spent = gpu.run(rows, "cpu", "float32", 60, budget_s=0, tiny=True, log=quiet)
    assert all(r["error"].startswith("not run") for r in spent)


def test_a_killed_run_leaves_the_rows_it_finished(tmp_path, monkeypatch):
    compress, calls = gpu.MEASURE["compress"], []

    def killed_at_the_third(row, state, guard):
        calls.append(row)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a device's time limit ends the process: no handler runs
        return compress(row, state, guard)

    monkeypatch.setitem(gpu.MEASURE, "compress", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "gpu", "--tiny", "--no-needle", "--shapes", "qwen3-8b", "--out-dir", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["row"] for r in results] == [row.name for row in calls[:2]]
    assert "vs_reference" in results[1]  # compared as far as it went
    assert f"| {calls[1].name} |" in (tmp_path / "gpu.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.md", "results.json"]  # no temp file left


def test_rows_that_do_not_fit_the_device_are_skipped_with_the_reason():
    rows = [gpu.Row("compress", "llama-3.1-8b", m, n) for m, n in (("plain", 128), ("kvpress", 512),
                                                                    ("kvcompose", 512))]
    plans = [gpu.memory_plan(row, "float32", "cpu", tiny=True)["peak"] for row in rows]
    capacity = gpu.HEADROOM_BYTES + plans[0] + 1  # the first fits; kvpress's 512 does not; nor kvcompose's
    assert plans[1] > plans[2] > plans[0]
    results = gpu.run(rows, "cpu", "float32", 60, 60, tiny=True, log=quiet, capacity_bytes=capacity)
    assert "seconds" in results[0] and "skipped" not in results[0]
    assert all("does not fit" in r["skipped"] and "seconds" not in r for r in results[1:])
    assert "64k two-pass with no out-of-memory error: missed" in results[2]["target"]


def test_plan_prints_every_row_and_what_fits_each_gpu(capsys):
    assert main(["bench", "gpu", "--plan", "--gpu-gib", "80", "--no-needle"]) == 0
    lines = {line.split(" | ")[0][2:]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert list(lines) == [row.name for row in gpu.plan(tiny=False, needle=False)]
    assert lines["compress/kvpress/llama-3.1-8b/32768"].endswith("| does not fit |")  # (heads, n, 2n) weights
    assert lines["compress/kvcompose/llama-3.1-8b/65536"].endswith("| fits |")
    assert main(["bench", "gpu", "--plan", "--gpu-gib", "141", "--no-needle", "--shapes", "qwen3-8b"]) == 0
    assert "fits 141 GiB (H200)" in capsys.readouterr().out.splitlines()[0]


def test_plan_counts_the_real_models_parameters():
    for shape in gpu.PLAN_SHAPES:
        config = gpu.model_config(shape)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        assert gpu.param_count(config) == sum(p.numel() for p in model.parameters()), shape
    assert gpu.param_count(gpu.model_config("llama-3.1-8b")) == 8_030_261_248  # Llama-3.1-8B's published count


class LiveBytes(TorchDispatchMode):
    """The peak bytes of tensors allocated while active and still alive (a CPU stand-in for
    ``torch.cuda.max_memory_allocated``): each new storage counts until it is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if t.untyped_storage().data_ptr() not in inputs:  # not a view, not in place
                self._count(t.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        if getattr(storage, "_counted", False) or not storage.nbytes():
            return
        storage._counted = True
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, storage.nbytes())

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("method", ["plain", "kvcompose", "kvcompose-1pass", "kvpress"])
def test_plan_predicts_a_tiny_runs_peak_memory(method):
    row = gpu.Row("compress", "llama-3.1-8b", method, gpu.TINY_LENGTHS[32768])
    planned = gpu.memory_plan(row, "float32", "cpu", tiny=True)
    model = gpu._build(row.shape, "cpu", "float32", tiny=True)["model"]
    assert planned["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())
    gpu._prefill(model, 64, method)  # first-use allocations are not the row's
    with LiveBytes() as tracked:
        kv = gpu._prefill(model, row.tokens, method)
    if method == "plain":
        assert planned["kv_cache"] == sum(k.nbytes + v.nbytes for k, v in zip(kv.keys, kv.values))
    assert 0.9 <= tracked.peak / planned["extra"] <= 1.2, (tracked.peak, planned)


def test_targets_pick_the_decode_bound_by_device_and_mark_each_row():
    row = {"row": "decode/b1/full/llama-3.1-8b/32768", "kind": "decode", "shape": "llama-3.1-8b",
           "method": "full", "tokens": 32768, "batch": 1, "tokens_per_s": 120.0}
    assert gpu.compare([dict(row)], "NVIDIA H100 80GB HBM3")[0]["target"].endswith(": met")
    assert gpu.compare([dict(row)], "NVIDIA H200")[0]["target"].endswith(": missed")
    assert "target" not in gpu.compare([{**row, "row": "decode/b1/full/llama-3.1-8b/8192", "tokens": 8192}])[0]


def test_decode_rows_record_how_the_steps_ran():
    from service.config import BatchLimits

    model = gpu._build("qwen3-8b", "cpu", "float32", tiny=True)["model"]
    assert gpu.graph_state(gpu.random_loop(model, BatchLimits())) == "eager (static steps off)"  # the CPU's default
    static = gpu.random_loop(model, BatchLimits(), static_steps=True)
    assert gpu.graph_state(static) == static._static.state == "eager (not CUDA)"
