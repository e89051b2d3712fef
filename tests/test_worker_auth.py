"""The standalone decode worker authenticates exactly as the Ingress: same config, same Frontend;
``kvcompose remote`` turns its refusal into one line that says where the token comes from."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
import yaml
from conftest import models_once_up

from service import cli
from service.client import KVComposeClient
from service.local.processes import free_port
from service.serve.launch import CONFIG


def test_the_worker_enforces_the_configured_api_tokens(tiny_model_dir, tmp_path, capsys):
    config = yaml.safe_load(CONFIG.read_text())
    config["applications"][0]["args"]["engine"]["model"] = str(tiny_model_dir)
    config["applications"][0]["args"]["auth_tokens"] = {"tok-alpha": "alpha"}
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "workers.decode", "--store", "127.0.0.1:1", "--address",
                               f"127.0.0.1:{port}", "--config", str(path)], env={**os.environ})
    try:
        with KVComposeClient(f"127.0.0.1:{port}", token="tok-alpha") as ok:
            assert models_once_up(ok).models[0].id == str(tiny_model_dir)
        for token, tenant in ((None, "alpha"), ("wrong", None)):
            with KVComposeClient(f"127.0.0.1:{port}", token=token, tenant=tenant) as outsider:
                with pytest.raises(grpc.RpcError) as e:
                    outsider.list_models()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as e:
                    outsider.ask("hi?", cache_id="0" * 64)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert cli.main(["remote", "models", "--addr", f"127.0.0.1:{port}", "--token", "wrong"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("kvcompose: UNAUTHENTICATED: the bearer token is not valid; ") and err.count("\n") == 1
        assert "--token" in err and "KVCOMPOSE_TOKEN" in err and f"instances/api-{port}/api-token" in err, err
    finally:
        worker.terminate()
        worker.wait(10)
