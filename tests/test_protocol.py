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


def test_an_engine_error_reaches_the_client_as_its_status():
    """The engine raises the protocol's types and the edge maps them: a bad press spec (raised deep in
    the press registry) is INVALID_ARGUMENT naming the press, an overloaded decode loop is
    RESOURCE_EXHAUSTED, a cancelled request CANCELLED; an unknown error never leaks its text."""
    import grpc
    import pytest

    from service import protocol
    from service.engine.presses import canonical
    from service.serve import messages

    with pytest.raises(protocol.PressSpecError) as bad:
        canonical({"press": "nope"})
    assert messages.to_status(bad.value, "r1") == (grpc.StatusCode.INVALID_ARGUMENT, str(bad.value))
    assert "nope" in str(bad.value)
    assert messages.to_status(protocol.Overloaded("full"), "r2")[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert messages.to_status(protocol.Cancelled("gone"), "r3")[0] == grpc.StatusCode.CANCELLED
    status, text = messages.to_status(RuntimeError("secret detail"), "r4")
    assert status == grpc.StatusCode.INTERNAL and "secret" not in text and "r4" in text
