"""The serving edge stays light: the Ingress and the API layer import no model stack, so a proxy
node or an Ingress replica starts in seconds and never loads torch, transformers or kvpress."""

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "kvpress")


def imported_after(module: str) -> list[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_the_ingress_and_the_api_layer_import_no_model_stack():
    assert imported_after("service.serve.app") == []
    assert imported_after("service.serve.messages") == []
    assert imported_after("service.protocol") == []


def test_the_work_modules_share_the_protocols_types():
    """One definition of each request and result type: the modules that do the work re-use them."""
    from service import protocol
    from service.engine import batching, cancel, decode
    from service.engine.presses import registry
    from service.serve import answerer, api, compressor

    assert decode.Sampling is api.Sampling is protocol.Sampling
    assert answerer.AnswerStats is protocol.AnswerStats and compressor.CompressResult is protocol.CompressResult
    assert batching.Overloaded is protocol.Overloaded and cancel.Cancelled is protocol.Cancelled
    assert registry.PressSpecError is protocol.PressSpecError
