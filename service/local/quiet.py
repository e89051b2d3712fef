"""The start-up lines of Ray, Serve and transformers that do not concern whoever starts the local
stack, silenced one source at a time: warnings and errors of anything else, and Serve's own, still show.
Ray's own INFO lines go by ``ray.init(logging_level=WARNING)`` (``LocalStack``)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

# Ray 2.60 turns token authentication on for a new local cluster and says so with a WARNING, and
# INFO when it writes ~/.ray/auth_token: what we want (Ray listens on loopback only), nothing to act on.
RAY_TOKEN_SETUP = "ray._private.authentication.authentication_token_setup"
# Serve's INFO lines while deploying: "Started Serve", "Connecting to existing Serve app ... New
# http_options will not be applied" (serve.run after our serve.start, which did apply them) and
# "Application ... is ready at http://127.0.0.1:8000/..." (the HTTP proxy, not the gRPC API).
SERVE = "ray.serve"


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


@contextmanager
def _dropped_below(logger: str, level: int) -> Iterator[None]:
    """A filter, not a level: Serve sets its logger's level itself when it starts."""
    below = _Below(level)
    logging.getLogger(logger).addFilter(below)
    try:
        yield
    finally:
        logging.getLogger(logger).removeFilter(below)


@contextmanager
def _no_gguf_progress_bar() -> Iterator[None]:
    """transformers' GGUF loader draws a tqdm bar (``tqdm.auto`` directly, which its own
    ``disable_progress_bar`` does not reach) when the embedded model is converted; the engine's log
    line already says that it converts, once, and for how long."""
    from transformers import modeling_gguf_pytorch_utils as gguf

    bar = gguf.tqdm
    gguf.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf.tqdm = bar


@contextmanager
def startup_quieted() -> Iterator[None]:
    """Around the local stack's start: the lines above, and nothing else, go unprinted."""
    with ExitStack() as stack:
        stack.enter_context(_dropped_below(RAY_TOKEN_SETUP, logging.ERROR))
        stack.enter_context(_dropped_below(SERVE, logging.WARNING))
        stack.enter_context(_no_gguf_progress_bar())
        yield
