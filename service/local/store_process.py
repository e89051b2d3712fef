"""The prefix store server (``python -m service.store.server``) as a child process of this one."""

from __future__ import annotations

import os
import subprocess
import sys

from service.local.processes import SupervisedProcess, dying_with_parent
from service.tls import TLSFiles


class StoreProcess(SupervisedProcess):
    """The store server on 127.0.0.1 (the local stack's, benchmarks' and tests').

    supervise: start it again on its port whenever it dies (checked every ``check_s``), as
    Kubernetes restarts the store's pod; its clients ride out the gap (``retry.py``) or answer
    UNAVAILABLE. ``restarts`` counts them.
    """

    name = "the prefix store"
    start_timeout_s = 60.0  # a busy machine's Python imports
    poll_s = 0.1

    def __init__(self, redis_url: str, port: int, env: dict | None = None, host: str = "127.0.0.1",
                 metrics_port: int = 0, tls: TLSFiles | None = None, supervise: bool = False,
                 check_s: float = 0.2):
        super().__init__(port, supervise, check_s)
        self.redis_url, self.env, self.host = redis_url, env or {}, host
        self.metrics_port = metrics_port  # 0: no /metrics endpoint
        self.tls = tls  # the files its health check dials with (the server reads its own from env)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self) -> subprocess.Popen:
        env = {**os.environ, "REDIS_URL": self.redis_url, **self.env}
        metrics = ["--metrics-address", f"{self.host}:{self.metrics_port}"] if self.metrics_port else []
        return subprocess.Popen(dying_with_parent([sys.executable, "-m", "service.store.server", "--address",
                                                   f"{self.host}:{self.port}", *metrics]), env=env,
                                start_new_session=True)  # a terminal's Ctrl-C reaches only the launcher

    def _serving(self) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from service.tls import channel

        with channel(self.address, self.tls) as health:
            try:
                reply = health_pb2_grpc.HealthStub(health).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING
