"""Chaos under load, where the orchestration layer feels it (the short run of ``kvcompose bench
chaos``): 16 clients ask through the API about their own documents while Redis, the store process,
a Decoder and a Compressor (mid-prefill) are killed and Redis fills past maxmemory. No wrong answer,
every failure a status a client retries, no call past its deadline, and the service serves again."""

from __future__ import annotations

from service.bench import chaos

from .conftest import DOCUMENT, QUESTION, normal_request_works

CLIENTS = 16
DURATION_S = 72.0


def test_faults_under_load_never_serve_a_wrong_answer(stack, client, reference):
    documents = [chaos.Document(f"Report {i}. " + DOCUMENT, QUESTION) for i in range(CLIENTS)]
    try:
        report = chaos.run(stack, documents, DURATION_S, deadline_s=30.0)
    finally:  # Redis came back empty: the suite's reference cache is stored again, whatever happened
        reference["cache_id"] = client.compress(DOCUMENT).cache_id
    summary = chaos.summary(report)
    assert [f.name for f in report.faults] == list(chaos.FAULTS)
    assert not report.wrong, summary["wrong_examples"]
    assert not report.late, [(c.status, round(c.end - c.start, 1)) for c in report.late[:5]]
    assert set(summary["statuses"]) <= {"OK"} | chaos.RETRYABLE, summary["statuses"]
    assert summary["statuses"]["OK"] > 4 * CLIENTS, summary
    assert stack.redis.restarts >= 1 and stack.store.restarts >= 1
    ok, _ = report.bins()
    assert sum(ok[-6:-1]) > 0, ok  # answering again at the end
    normal_request_works(client, reference)
