"""``kvcompose serve`` (what ``make serve`` runs) as a user runs it: it comes up, answers, and stops
cleanly on Ctrl-C (SIGINT to its whole process group, as a terminal sends it) or SIGTERM: exit code
0, no stack dump, every child process ended, no temporary directory or state directory (token, CA) left behind.
``serve --tls`` (``make serve TLS=1``) serves the API over TLS only, and ``kvcompose remote`` finds
its CA by itself."""

from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil
import pytest
import yaml

from service.client import KVComposeClient
from service.local.processes import free_port
from service.serve.launch import CONFIG
from service.tls import TLSFiles

ROOT = Path(__file__).resolve().parents[1]


# Start-up lines of Ray and Serve that do not concern the user (service/local/quiet.py); the GGUF
# conversion bar is test_startup_quieted_drops_only_the_named_lines's (the tiny model is no GGUF).
STARTUP_NOISE = ("Token authentication is enabled", "will not be applied", "is ready at http",
                 "Started a local Ray instance")


def as_at_a_terminal() -> None:
    """In the child: Ctrl-C's default action, as a shell gives a command at a terminal. Run from a
    background job of a non-interactive shell (``cmd &``), the suite inherits SIGINT ignored, and a
    Python started so never sees KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

def serve_config(path: Path, model_dir: Path) -> tuple[Path, int]:
    """The project's Serve config with the tiny model, small replicas and free ports."""
    config = yaml.safe_load(CONFIG.read_text())
    grpc_port = free_port()
    config["grpc_options"]["port"] = grpc_port
    config["http_options"]["port"] = free_port()
    app = config["applications"][0]
    app["args"]["engine"].update(model=str(model_dir), max_context_tokens=4096)
    for deployment in app["deployments"]:
        deployment.setdefault("ray_actor_options", {})["num_cpus"] = 0.2
    path.write_text(yaml.safe_dump(config))
    return path, grpc_port


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "tls"])
def test_serve_comes_up_answers_and_stops_cleanly(tiny_model_dir, tmp_path, how):
    config, grpc_port = serve_config(tmp_path / "serve.yaml", tiny_model_dir)
    scratch, cache = Path(tempfile.mkdtemp(prefix="kvc-t-", dir="/tmp")), tmp_path / "cache"  # Ray's socket
    # paths must stay under 107 bytes: a short TMPDIR
    env = {**os.environ, "TMPDIR": str(scratch), "XDG_CACHE_HOME": str(cache)}
    env.pop("REDIS_URL", None)  # the embedded, supervised Redis, as on a laptop
    log = (tmp_path / "serve.log").open("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--config", str(config), "--store-port", str(free_port()),
         "--store-metrics-port", str(free_port()), "--ray-metrics-port", str(free_port()),
         *(["--tls"] if how == "tls" else [])],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its own terminal group
        preexec_fn=as_at_a_terminal)
    try:
        deadline = time.monotonic() + 240
        while "KVCompose Serve is up" not in (tmp_path / "serve.log").read_text():
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.5)
        state = cache / "kvcompose" / "instances" / f"api-{grpc_port}"  # this instance's own secrets
        token = (state / "api-token").read_text().strip()
        tls = TLSFiles(ca_file=str(state / "tls" / "server" / "ca.crt")) if how == "tls" else None
        with KVComposeClient(f"127.0.0.1:{grpc_port}", token=token, timeout_s=120, tls=tls) as client:
            cache_id = client.compress("The lighthouse on Kessel Point was built in 1871. " * 20).cache_id
            text, stats = client.ask("When was it built?", cache_id=cache_id, max_new_tokens=4)
            assert stats.new_tokens > 0
        if how == "tls":
            with KVComposeClient(f"127.0.0.1:{grpc_port}", token=token, timeout_s=10, retries=False) as plain:
                with pytest.raises(grpc.RpcError) as e:
                    plain.list_models()
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # plaintext is refused
            remote = subprocess.run([sys.executable, "-m", "service.cli", "remote", "ask", "--addr",
                                     f"127.0.0.1:{grpc_port}", "--cache-id", cache_id, "--max-new-tokens", "4",
                                     "When was it built?"], cwd=ROOT, env=env, capture_output=True, text=True,
                                    timeout=120)
            assert remote.returncode == 0 and remote.stdout.strip(), remote.stderr[-2000:]
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) >= 4  # Redis, the store, Ray's processes and replicas

        if how == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = (tmp_path / "serve.log").read_text()
    for noise in ("Traceback", "SIGTERM received", "Aborted", "*** ", *STARTUP_NOISE):
        assert noise not in output, output[-3000:]
    assert f"gRPC API (kvcompose.v1.KVCompose): 127.0.0.1:{grpc_port}" in output
    assert "Stopped." in output
    time.sleep(2)  # Ray's last workers exit right after the driver
    alive = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.name()) for p in alive]
    left = list(scratch.iterdir())
    shutil.rmtree(scratch, ignore_errors=True)
    assert not left, left  # no Redis or Ray temporary directory left
    assert not state.exists()  # no token or CA left behind


def test_startup_quieted_drops_only_the_named_lines():
    """Serve's INFO lines and Ray's token-auth notice go while the local stack starts, their warnings
    and errors (and everything after) still show; transformers' GGUF conversion draws no bar."""
    import logging

    from transformers import modeling_gguf_pytorch_utils as gguf

    from service.local.quiet import RAY_TOKEN_SETUP, SERVE, startup_quieted

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    keep, levels = Keep(), {name: logging.getLogger(name).level for name in (SERVE, RAY_TOKEN_SETUP)}
    for name in levels:
        logging.getLogger(name).addHandler(keep)
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        with startup_quieted():
            assert gguf.tqdm(range(3)).disable
            logging.getLogger(SERVE).info("Application 'kvcompose' is ready at http://127.0.0.1:8000/")
            logging.getLogger(SERVE).warning("a Serve warning")
            logging.getLogger(RAY_TOKEN_SETUP).warning("Token authentication is enabled")
            logging.getLogger(RAY_TOKEN_SETUP).error("no token")
        logging.getLogger(SERVE).info("after start-up")
        assert not gguf.tqdm(range(3), file=open(os.devnull, "w")).disable
    finally:
        for name, level in levels.items():
            logging.getLogger(name).removeHandler(keep)
            logging.getLogger(name).setLevel(level)
    assert records == ["a Serve warning", "no token", "after start-up"]


def read_until(fd: int, marker: bytes, timeout_s: float = 30) -> bytes:
    """What a pseudo-terminal's other end shows, up to ``marker`` (or all until it closes)."""
    seen, deadline = b"", time.monotonic() + timeout_s
    while marker not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # closed: everyone on the terminal has exited
                break
            if not chunk:
                break
            seen += chunk
    return seen


@pytest.mark.skipif(not (shutil.which("make") and shutil.which("setsid")), reason="needs make and setsid")
@pytest.mark.parametrize("owns_terminal", [True, False])
def test_ctrl_c_at_a_terminal_ends_make_serve_with_exit_code_0(tmp_path, owns_terminal):
    """make answers a Ctrl-C that reaches it by exiting 130 whatever its recipe returns (the probe,
    ``owns_terminal=False``); ``kvcompose serve`` takes the terminal's foreground under make
    (``own_terminal``, here in a stand-in that stops at once), so make passes on its 0."""
    (tmp_path / "serve.py").write_text(
        "import contextlib, time\nfrom service.local.terminal import own_terminal\n"
        f"with {'own_terminal()' if owns_terminal else 'contextlib.nullcontext()'}:\n"
        "    try:\n        print('up', flush=True)\n        time.sleep(60)\n"
        "    except KeyboardInterrupt:\n        print('stopped', flush=True)\n")
    (tmp_path / "Makefile").write_text(f"serve:\n\t@{sys.executable} serve.py\n")
    terminal, its_end = pty.openpty()
    make = subprocess.Popen(["setsid", "--ctty", "make", "-s", "serve"], cwd=tmp_path, stdin=its_end,
                            stdout=its_end, stderr=its_end, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=as_at_a_terminal)
    os.close(its_end)
    try:
        assert b"up" in read_until(terminal, b"up")
        os.write(terminal, b"\x03")  # Ctrl-C
        assert b"stopped" in read_until(terminal, b"stopped")
        assert (make.wait(timeout=30) == 0) == owns_terminal
    finally:
        make.kill()
        os.close(terminal)


def test_every_deployment_option_of_the_config_reaches_serve_run():
    """The public path (serve.run) does not read the config: ``deployment_options`` carries each
    deployment's options from the file, with the app's runtime_env in every actor's options."""
    from ray.serve.schema import ServeDeploySchema

    from service.serve.app import application
    from service.serve.launch import deployment_options, load_config

    config = load_config(CONFIG)
    app = config["applications"][0]
    app["runtime_env"] = {"env_vars": {"KVCOMPOSE_STORE_SERVICE_TOKEN": "t"}}
    app["deployments"][0]["ray_actor_options"]["runtime_env"] = {"env_vars": {"OWN": "1"}}
    dumped = ServeDeploySchema.model_validate(config).applications[0].model_dump(exclude_unset=True)
    options = deployment_options(dumped)
    decoder = next(d for d in app["deployments"] if d["name"] == "Decoder")
    assert options["Decoder"]["max_queued_requests"] == decoder["max_queued_requests"]
    assert options["Decoder"]["request_router_config"]["request_router_kwargs"] == {"overloaded_at": 16}
    assert all(o["ray_actor_options"]["runtime_env"]["env_vars"]["KVCOMPOSE_STORE_SERVICE_TOKEN"] == "t"
               for o in options.values())
    assert options[app["deployments"][0]["name"]]["ray_actor_options"]["runtime_env"]["env_vars"]["OWN"] == "1"
    application(app["args"], options)  # Deployment.options raises on any option it does not take
    with pytest.raises(ValueError, match="unknown deployments"):
        application(app["args"], {"Decodr": {}})


def test_load_config_deep_merges_every_override():
    """An override names only what changes: a port keeps the file's gRPC servicer functions, one engine
    arg keeps the others; lists and other values replace; the overrides given are not aliased."""
    from service.serve.launch import load_config

    file = yaml.safe_load(CONFIG.read_text())
    file_app = file["applications"][0]
    top = {"grpc_options": {"port": 9123}, "http_options": {"host": "127.0.0.1"}, "proxy_location": "HeadOnly"}
    config = load_config(CONFIG, args={"engine": {"max_context_tokens": 1024}},
                         deployments={"Decoder": {"ray_actor_options": {"num_cpus": 0.1}}}, **top)
    assert config["grpc_options"] == {**file["grpc_options"], "port": 9123}
    assert config["http_options"] == {**file["http_options"], "host": "127.0.0.1"}
    assert config["proxy_location"] == "HeadOnly" and config["logging_config"] == file["logging_config"]
    app = config["applications"][0]
    assert app["args"]["engine"] == {**file_app["args"]["engine"], "max_context_tokens": 1024}
    assert app["args"]["store"] == file_app["args"]["store"]
    decoder, file_decoder = ({d["name"]: d for d in a["deployments"]}["Decoder"] for a in (app, file_app))
    assert decoder == {**file_decoder, "ray_actor_options": {**file_decoder["ray_actor_options"], "num_cpus": 0.1}}
    config["grpc_options"]["port"] = 1
    assert top["grpc_options"] == {"port": 9123}
    assert load_config(CONFIG, grpc_options={"grpc_servicer_functions": []})["grpc_options"] == {
        **file["grpc_options"], "grpc_servicer_functions": []}


def test_make_serve_takes_the_device_and_dtype_from_the_environment(monkeypatch):
    """``KVCOMPOSE_DEVICE=cuda KVCOMPOSE_COMPUTE_DTYPE=bfloat16 make serve``: the engine args and a share of
    the GPU for each engine deployment, over the config file's values; nothing set leaves the file as it is."""
    from service.config import EngineConfig
    from service.serve.launch import app_args, load_config, local_engine_overrides

    for name in ("KVCOMPOSE_DEVICE", "KVCOMPOSE_COMPUTE_DTYPE", "KVCOMPOSE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    assert local_engine_overrides() == ({}, {})
    monkeypatch.setenv("KVCOMPOSE_DEVICE", "cuda")
    monkeypatch.setenv("KVCOMPOSE_COMPUTE_DTYPE", "bfloat16")
    engine, deployments = local_engine_overrides()
    config = load_config(CONFIG, args={"engine": engine}, deployments=deployments)
    typed = EngineConfig(**app_args(config).engine)
    assert (typed.device, typed.compute_dtype, typed.model) == ("cuda", "bfloat16", "smollm2-135m-instruct")
    options = {d["name"]: d["ray_actor_options"] for d in config["applications"][0]["deployments"]}
    assert options["Compressor"]["num_gpus"] == options["Decoder"]["num_gpus"] == 0.5
    assert options["Compressor"]["num_cpus"] == 0.5  # the file's other options stay
    monkeypatch.setenv("KVCOMPOSE_COMPUTE_DTYPE", "float8")
    with pytest.raises(ValueError, match="compute_dtype"):
        EngineConfig(**local_engine_overrides()[0])
    monkeypatch.delenv("KVCOMPOSE_COMPUTE_DTYPE")  # a GPU alone means bfloat16, not the file's CPU float32
    assert EngineConfig(**app_args(load_config(CONFIG, args={"engine": local_engine_overrides()[0]})).engine
                        ).compute_dtype == "bfloat16"


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_float32_on_cuda_is_refused_with_the_dtype_to_use(device):
    """float32 on CUDA would put attention on SDPA's math backend (queries x keys in memory)."""
    from service.config import EngineConfig

    with pytest.raises(ValueError, match="compute_dtype float32 on CUDA .* set compute_dtype: bfloat16"):
        EngineConfig(device=device, compute_dtype="float32")
    assert EngineConfig(device=device, compute_dtype="bfloat16").compute_dtype == "bfloat16"
