"""What the service benchmarks run against: ``make serve``'s stack on free ports, and the embedded
model's tokenizer to write their documents with."""

from __future__ import annotations


def local_stack():
    """A ``LocalStack`` (enter it to start) with ``make serve``'s config, its API and HTTP ports free ones."""
    from service.local.processes import free_port
    from service.local.stack import LocalStack

    return LocalStack(top={"grpc_options": {"port": free_port()}, "http_options": {"port": free_port()}})


def embedded_tokenizer():
    """The embedded SmolLM2's tokenizer (converted once, like the service's model)."""
    from transformers import AutoTokenizer

    from service.config import EngineConfig
    from service.engine.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir(EngineConfig().cache_dir))
