"""A stack with two Decoder replicas serving the tiny model (routing and load tests), with small
admission limits: each replica batches 4 answers and queues 4 (Serve hands it at most 8), and
Serve queues at most 4 more in front of them."""

import pytest

from tests.reliability.conftest import tiny_stack


@pytest.fixture(scope="package")
def stack(tiny_model_dir):
    with tiny_stack(tiny_model_dir, decoders=2, decoder_options={"max_ongoing_requests": 8, "max_queued_requests": 4},
                    decode_batch={"max_batch": 4, "max_waiting": 4}) as stack:
        yield stack
