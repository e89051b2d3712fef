"""Accuracy runner: every press and ratio on RULER-style samples, fast enough for CPUs.

Per sample: one plain prefill records each attention layer's inputs (hidden states, position
embeddings) and the full KV cache. Every press then runs its own hooks on those recorded inputs,
layer by layer, without another model forward: compression in one layer does not change the next
layer's prefill input, so this is exactly what the press computes alone (a test checks it).
KVCompose (alone or after other presses, e.g. ThinK) scores once per sample (its replay runs once)
and selects per ratio. All (press, ratio) caches then answer the sample's question together, one
batched greedy decode through the service's own loop (``batching.DecodeLoop.answer``): a CPU
decode step costs about the same for one cache as for twenty. A row stops early once its score
can no longer change (every reference found), which leaves every score exactly as a full-length
answer would. Rows are appended to a
CSV per sample; a rerun skips rows already there, so an interrupted run resumes.
"""

from __future__ import annotations

import copy
import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

from service.bench import codec_variants, metrics, ruler
from service.cache.kvcache import CacheMeta, CompressedKV
from service.config import BatchLimits
from service.engine.batching import Request
from service.engine.engine import Engine
from service.engine.prefill import collect
from service.engine.presses import build, canonical, presses_in
from service.engine.presses.kvcompose import AUTO_ONE_PASS, SCORERS, KVComposePress
from service.protocol import Sampling

TASK_AWARE = "kvcompose-aware"  # KVCompose scored by the sample's question (its row label)
TASK_PROMPTS = {  # --task-prompts value -> row label of KVCompose scored by that prompt
    "question": TASK_AWARE,
    "paraphrase": TASK_AWARE + "-paraphrase",  # the question reworded: an imperfect expected question
    "unrelated": TASK_AWARE + "-unrelated",  # a prompt about something else: the wrong expected question
}
ANSWER_BATCH = 16  # caches decoded together (the decode loop's max_batch)

FIELDS = ["model", "length", "task", "sample", "press", "ratio", "kept_fraction", "bytes_float16", "bytes_int8",
          "score", "prediction", "answers", "press_json", "bytes_stored"]  # bytes_stored: in the row's codec


@dataclass
class Recorded:
    """One plain prefill: per-layer attention inputs and the uncompressed cache."""

    ids: torch.Tensor
    kwargs: list[dict]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def cache(self) -> DynamicCache:
        return _cache_copy(self.keys, self.values)


def record(model, ids: list[int]) -> Recorded:
    kwargs: list[dict] = [{} for _ in model.model.layers]

    def hook(module, args, kw, output):
        kwargs[module.layer_idx] = {"hidden_states": kw["hidden_states"],
                                    "position_embeddings": kw["position_embeddings"],
                                    "cache_position": kw["cache_position"]}

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    cache = DynamicCache()
    tensor = torch.tensor([ids], device=model.device)
    try:
        with torch.inference_mode():
            model.model(input_ids=tensor, past_key_values=cache, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    return Recorded(tensor, kwargs, [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers])


def run_press(model, press, rec: Recorded, cache: DynamicCache | None = None) -> DynamicCache:
    """The press's hooks on the recorded inputs, layer by layer: its compressed cache.

    ``cache``: the cache the hooks compress (default: a copy of the recorded one), e.g. the output
    of earlier presses of a composition.
    """
    cache = rec.cache() if cache is None else cache
    # Entering the press registers its hooks (they fire only in forwards the press itself runs, such as
    # KVCompose's replay); the recorded layers are then fed to its hook directly.
    with torch.inference_mode(), press(model):
        for p in presses_in(press):
            if isinstance(p, KVComposePress):
                p.set_context(rec.ids)
        for layer in model.model.layers:
            kwargs = {**rec.kwargs[layer.self_attn.layer_idx], "past_key_values": cache, "attention_mask": None}
            press.forward_hook(layer.self_attn, (), kwargs, (None, None))
    return cache


def with_ratio(spec: dict, ratio: float) -> dict:
    """The spec with ``ratio`` as the compression_ratio of every (sub-)press that has one."""
    spec = copy.deepcopy(canonical(spec))

    def visit(s: dict) -> None:
        if "compose" in s:
            for part in s["compose"]:
                visit(part)
            return
        if "compression_ratio" in s:
            s["compression_ratio"] = ratio
        if isinstance(s.get("inner"), dict):
            visit(s["inner"])

    visit(spec)
    return spec


def label(spec: dict) -> str:
    spec = canonical(spec)
    if "compose" in spec:
        return "+".join(label(p) for p in spec["compose"])
    if spec["press"] != "kvcompose":
        return spec["press"]
    # each scoring its own rows: the same press name, another scoring
    if not spec["replay_context"] or spec["scorer"] not in ("auto", "attention"):  # one pass, always
        scorer = {"auto": AUTO_ONE_PASS}.get(spec["scorer"], spec["scorer"])
        return "kvcompose-1pass" if scorer == "attention" else f"kvcompose-{scorer}"
    if spec["replay_fraction"] < 1:
        return f"kvcompose-replay{spec['replay_fraction']:g}"
    return "kvcompose-attention" if spec["scorer"] == "attention" else "kvcompose"  # they differ past 2/3 of the window


class AccuracyRun:
    def __init__(self, engine: Engine, out: Path, length: int):
        self.engine, self.out, self.length = engine, Path(out), length
        self.done = self._done()

    def _done(self) -> set[tuple]:
        if not self.out.exists():
            return set()
        with self.out.open() as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != FIELDS:  # appending would shift every new row under the old header
                raise ValueError(f"{self.out} has the columns {reader.fieldnames}, this runner writes {FIELDS}: "
                                 "add the missing columns to the file or write to a new --out")
            return {(r["task"], int(r["sample"]), r["press"], float(r["ratio"])) for r in reader
                    if int(r["length"]) == self.length}

    def _write(self, row: dict) -> None:
        new = not self.out.exists()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with self.out.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)

    def run(self, tasks: list[str], samples: int, presses: list[dict], ratios: list[float],
            task_prompts: tuple[str, ...] = ("question",), codecs: tuple[str, ...] = (),
            codec_presses: tuple[str, ...] | None = None) -> None:
        """task_prompts: rows of KVCompose scored by the question, its paraphrase or an unrelated prompt.
        codecs: also answer from each cache after a round trip through these codecs ("<press>@<codec>"),
        for the press labels in codec_presses (None: all, "none" included)."""
        engine, model = self.engine, self.engine.loaded.model
        jobs = [(t, s) for s in range(samples) for t in tasks]  # sample-major: a stopped run stays balanced
        for task, seed in tqdm(jobs, desc=f"accuracy @ {self.length} tokens", unit="sample"):
            sample = ruler.generate(task, engine.loaded.tokenizer, self.length, seed)
            stored = [("none", 0.0, {})] + [(label(p), r, with_ratio(p, r)) for p in presses for r in ratios]
            plan = stored + [(TASK_PROMPTS[k], r, with_ratio({"press": "kvcompose"}, r))
                             for k in task_prompts for r in ratios]
            plan += [(f"{name}@{c}", r, spec) for c in codecs for name, r, spec in stored
                     if codec_presses is None or name in codec_presses]
            plan = [job for job in plan if (task, seed, job[0], job[1]) not in self.done]
            if not plan:
                continue
            ids = engine.context_ids(sample.context)
            question = engine.prompt.question_ids(sample.question, sample.answer_prefix)
            rec = record(model, ids)
            scored: dict[str, tuple] = {}
            made: dict[tuple[str, float], CompressedKV] = {}
            kvs = []
            for name, ratio, spec in plan:
                press, _, codec_name = name.partition("@")
                if (press, ratio) not in made:
                    made[(press, ratio)] = self._compress(rec, press, spec, sample, scored)
                kv = made[(press, ratio)]
                kvs.append(_through_codec(kv, codec_name) if codec_name else kv)
            del rec, scored, made
            predictions = self._answer(kvs, question, sample)
            for (name, ratio, spec), kv, prediction in zip(plan, kvs, predictions):
                score = metrics.metric_for(task)([prediction], [sample.answers])
                kept = sum(kv.kept_tokens_per_layer()) / (kv.num_layers * len(ids))
                self._write({
                    "model": engine.model_id, "length": self.length, "task": task, "sample": seed, "press": name,
                    "ratio": ratio, "kept_fraction": round(kept, 4),
                    "bytes_float16": _nbytes(kv, "float16"), "bytes_int8": _nbytes(kv, "int8"), "score": score,
                    "prediction": prediction, "answers": json.dumps(sample.answers), "press_json": json.dumps(spec),
                    "bytes_stored": _nbytes(kv, name.partition("@")[2] or "float16")})
                self.done.add((task, seed, name, ratio))

    def _compress(self, rec: Recorded, name: str, spec: dict, sample, scored: dict) -> CompressedKV:
        model = self.engine.loaded.model
        meta = CacheMeta(self.engine.model_id, self.engine.loaded.revision, rec.ids.shape[1], spec)
        parts = spec.get("compose", [spec]) if spec else []
        if parts and parts[-1]["press"] == "kvcompose":  # score once per sample, select per ratio
            # a kvpress scorer takes the ratio (Compactor blends by it): it scores again per ratio
            entry = scored.get(name)
            if entry is None or entry[2] not in (None, parts[-1]["compression_ratio"]):
                before = parts[0] if len(parts) == 2 else {"compose": parts[:-1]} if len(parts) > 2 else None
                base = run_press(model, build(before), rec) if before else rec.cache()
                prompt = {TASK_PROMPTS["question"]: sample.question, TASK_PROMPTS["paraphrase"]: sample.paraphrase,
                          TASK_PROMPTS["unrelated"]: ruler.UNRELATED}.get(name)
                scorer = build(parts[-1], [self.engine.prompt.question_ids(prompt)] if prompt else None)
                run_press(model, scorer, rec, _copy(base))
                selection = scorer.last_selection
                ratio = parts[-1]["compression_ratio"] if selection["scored_by"] in SCORERS else None
                scored[name] = (base, selection["scores"], ratio)
            base, scores, _ = scored[name]
            cache = _copy(base)
            selector = build(parts[-1])
            selector.compress_with_scores(scores, cache)
            return collect(model, cache, meta, selector)
        press = build(spec)
        cache = run_press(model, press, rec) if press is not None else rec.cache()
        return collect(model, cache, meta, press)

    def _answer(self, kvs: list[CompressedKV], question: list[int], sample) -> list[str]:
        """Every cache's greedy answer; a row ends once all its references are found (score final)."""
        tokenizer, metric = self.engine.loaded.tokenizer, metrics.metric_for(sample.task)

        def finished(tokens: list[int]) -> bool:
            return metric([tokenizer.decode(tokens, skip_special_tokens=True)], [sample.answers]) == 100

        # The service's decode loop, in this thread: ANSWER_BATCH rows at a time, a row leaving frees its place.
        sampling = Sampling(max_new_tokens=sample.max_new_tokens, stop_token_ids=self.engine.stop_token_ids())
        loop = self.engine.new_decode_loop(BatchLimits(max_batch=ANSWER_BATCH, memory_bytes=1 << 50))
        answers = loop.answer([Request(kv, question, sampling, until=finished) for kv in kvs])
        return [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in answers]


def _through_codec(kv: CompressedKV, codec_name: str) -> CompressedKV:
    """The cache as a decode worker gets it: stored with ``codec_name`` (or a ``codec_variants`` layout)
    and read back."""
    return codec_variants.read_back(kv, codec_name)


def _copy(cache: DynamicCache) -> DynamicCache:
    return _cache_copy([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers])


def _cache_copy(keys: list[torch.Tensor], values: list[torch.Tensor]) -> DynamicCache:
    return DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in zip(keys, values)])


def _nbytes(kv: CompressedKV, codec_name: str) -> int:
    return codec_variants.stored_bytes(kv, codec_name)
