"""One door: ``kvcompose serve --tls --host ADDR`` is reachable from another host only through its
TLS door, and the door buffers nothing for a caller without a valid token.

The other host is a network namespace made here, joined to this machine by a veth pair on a /30 of
10.213.0.0/16 used by nothing else; traffic goes only between the two ends. It is removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
from test_serve_command import ROOT, serve_config

from service.client import KVComposeClient
from service.local.processes import free_port
from service.serve.binding import listeners
from service.tls import TLSFiles, channel

COMPRESS = "/kvcompose.v1.KVCompose/Compress"


def sh(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot make the test host: `{' '.join(args)}` failed: {done.stderr.strip()}")


@pytest.fixture(scope="module")
def other_host():
    """(namespace, this machine's address on the link, the namespace's). Fails, never skips, when
    the namespace cannot be made: the test is the only proof of the door."""
    if shutil.which("ip") is None:
        pytest.fail("cannot make the test host: iproute2's `ip` is not installed")
    tag = os.getpid() % 10000
    ns, here, there = f"kvc-door-{tag}", f"kvcd{tag}a", f"kvcd{tag}b"
    subnet = (os.getpid() // 64) % 256
    host_ip, ns_ip = f"10.213.{subnet}.{(tag % 64) * 4 + 1}", f"10.213.{subnet}.{(tag % 64) * 4 + 2}"
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        sh("ip", "link", "set", there, "netns", ns)
        sh("ip", "addr", "add", f"{host_ip}/30", "dev", here)
        sh("ip", "link", "set", here, "up")
        sh("ip", "-n", ns, "addr", "add", f"{ns_ip}/30", "dev", there)
        sh("ip", "-n", ns, "link", "set", there, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield ns, host_ip, ns_ip
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)  # takes its peer with it
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def in_namespace(ns: str, code: str, *args: str) -> object:
    """Run ``code`` (Python, printing JSON) on the other host."""
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def service(other_host, tiny_model_dir, tmp_path_factory):
    """``kvcompose serve --tls`` with its API on the link's address: (process, address, token, CA)."""
    _, host_ip, _ = other_host
    tmp = tmp_path_factory.mktemp("door")
    config, port = serve_config(tmp / "serve.yaml", tiny_model_dir)
    scratch = Path(tempfile.mkdtemp(prefix="kvc-d-", dir="/tmp"))  # Ray's socket paths stay short
    env = {**os.environ, "TMPDIR": str(scratch), "XDG_CACHE_HOME": str(tmp / "cache")}
    env.pop("REDIS_URL", None)
    state, log = tmp / "state", tmp / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--config", str(config), "--tls", "--host", host_ip,
         "--state-dir", str(state), "--store-port", str(free_port()), "--store-metrics-port", str(free_port()),
         "--ray-metrics-port", str(free_port())],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "KVCompose Serve is up" not in log.read_text():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.5)
        yield (process, f"{host_ip}:{port}", (state / "api-token").read_text().strip(),
               str(state / "tls" / "server" / "ca.crt"))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(scratch, ignore_errors=True)


DIAL_ALL = """
import json, socket, sys
host, ports = sys.argv[1], json.loads(sys.argv[2])
answered = []
for port in ports:
    try:
        socket.create_connection((host, port), timeout=3).close()
        answered.append(port)
    except OSError:
        pass
print(json.dumps(answered))
"""

CALL_API = """
import json, sys
import grpc
from service.client import KVComposeClient
from service.tls import TLSFiles
address, token, ca = sys.argv[1:4]
seen = {}
for name, tls in (("plaintext", None), ("tls", TLSFiles(ca_file=ca))):
    try:
        with KVComposeClient(address, token=token, timeout_s=60, tls=tls, retries=False) as client:
            seen[name] = [m.id for m in client.list_models().models]
    except grpc.RpcError as e:
        seen[name] = e.code().name
print(json.dumps(seen))
"""


def test_from_another_host_only_the_tls_door_answers(service, other_host):
    process, address, token, ca = service
    ns, host_ip, _ = other_host
    door = int(address.rsplit(":", 1)[1])
    opened = listeners(process.pid)
    ports = sorted({x.port for x in opened})
    assert door in ports and len(ports) >= 10, opened  # the door, our store and Redis, Serve, Ray's own
    assert {x.port for x in opened if not x.loopback} == {door}, opened

    answered = in_namespace(ns, DIAL_ALL, host_ip, json.dumps(ports))
    assert answered == [door]  # every other port of the stack is closed to the other host

    seen = in_namespace(ns, CALL_API, address, token, ca)
    assert seen["plaintext"] == "UNAVAILABLE"  # the door speaks TLS only
    assert seen["tls"] and isinstance(seen["tls"], list), seen  # and the API answers through it


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def test_the_door_reads_no_body_without_a_valid_token(service):
    process, address, token, ca = service
    tls = TLSFiles(ca_file=ca)
    baseline, peak, stop = rss(process.pid), [0], threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], rss(process.pid))

    def send(metadata: tuple, size: int) -> grpc.StatusCode:
        with channel(address, tls, options=[("grpc.max_send_message_length", -1)]) as ch:
            call = ch.unary_unary(COMPRESS, request_serializer=None, response_deserializer=None)
            try:
                call(bytes(size), metadata=metadata, timeout=120)
            except grpc.RpcError as e:
                return e.code()
        return grpc.StatusCode.OK

    strangers = [(), (("authorization", "Bearer not-a-token"),)] * 2
    codes: list[grpc.StatusCode] = []
    watcher = threading.Thread(target=watch)
    watcher.start()
    senders = [threading.Thread(target=lambda m=m: codes.append(send(m, 192 << 20))) for m in strangers]
    try:
        for t in senders:
            t.start()
        for t in senders:
            t.join(180)
    finally:
        stop.set()
        watcher.join()
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 4
    grown = max(peak[0], rss(process.pid)) - baseline
    assert grown < 64 << 20, f"the launcher grew by {grown / 2**20:.0f} MiB for unauthenticated bytes"

    # the door's limit is the proxy's (16 MiB): a caller with a token is refused past it, by gRPC
    assert send((("authorization", f"Bearer {token}"),), 17 << 20) == grpc.StatusCode.RESOURCE_EXHAUSTED
    with KVComposeClient(address, token=token, timeout_s=120, tls=tls) as client:
        cache_id = client.compress("The lighthouse on Kessel Point was built in 1871. " * 20).cache_id
        _, stats = client.ask("When was it built?", cache_id=cache_id, max_new_tokens=4)
        assert stats.new_tokens > 0


BIND = """
import socket, sys, time
servers = [socket.create_server((host, 0)) for host in sys.argv[1:]]
print(" ".join(str(s.getsockname()[1]) for s in servers), flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("hosts", [["127.0.0.1", "0.0.0.0"], ["127.0.0.1", "127.0.0.1"]])
def test_a_listener_open_to_other_hosts_is_named_and_refused(hosts):
    from service.serve.binding import ExposedPorts, check_one_door

    process = subprocess.Popen([sys.executable, "-c", BIND, *hosts], stdout=subprocess.PIPE, text=True)
    try:
        door, other = (int(p) for p in process.stdout.readline().split())
        if hosts[1] == "0.0.0.0":
            with pytest.raises(ExposedPorts, match=rf"0\.0\.0\.0:{other} \(python, pid {process.pid}\)"):
                check_one_door(("127.0.0.1", door), process.pid)
        else:  # loopback only: nothing to refuse
            assert {x.port for x in check_one_door(("127.0.0.1", door), process.pid)} == {door, other}
    finally:
        process.kill()
        process.wait()
