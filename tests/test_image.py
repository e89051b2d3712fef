"""The image Kubernetes runs, built and used here: ``make image`` builds it (or reuses it when the
Dockerfile and sources are unchanged), ``kvcompose serve`` runs in it with the embedded model and Redis,
the host compresses a document and asks about it over gRPC, every process inside runs as non-root,
and SIGTERM stops it cleanly. The test marked ``image`` runs with ``make image-test`` (CI, after
``make test``); the rest check the build script and the manifests in the default run."""

from __future__ import annotations

import importlib.util
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from service.client import KVComposeClient
from service.local.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "image.py"
spec = importlib.util.spec_from_file_location("image_script", SCRIPT)
image_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(image_script)


def test_host_pip_settings_reach_the_build_as_one_file_and_read_only_mounts(tmp_path):
    """PIP_* variables win over files; every path they name (a file:// index with the folder its
    pages link into) is mounted, nothing that does not exist."""
    index = tmp_path / "pypi" / "simple"
    index.mkdir(parents=True)
    (tmp_path / "ca.crt").write_text("")
    listing = (f":env:.cert='{tmp_path}/ca.crt'\n:env:.default-timeout='180'\n"
               f"global.cert='/nowhere/ca.crt'\nglobal.extra-index-url='file://{index} https://mirror.example/simple'\n"
               "install.no-compile='1'\n")
    settings = image_script.pip_settings(listing)
    assert settings == {"global": {"cert": f"{tmp_path}/ca.crt", "default-timeout": "180",
                                   "extra-index-url": f"file://{index} https://mirror.example/simple"},
                        "install": {"no-compile": "1"}}
    assert image_script.named_paths(settings) == sorted([f"{tmp_path}/ca.crt", str(tmp_path / "pypi")])
    assert image_script.pip_conf(settings).startswith(f"[global]\ncert = {tmp_path}/ca.crt\n")


def test_torch_comes_from_a_local_cpu_wheel_where_pip_finds_one(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_INDEX", raising=False)
    settings = {"global": {"find-links": str(tmp_path)}}
    assert image_script.torch_index(settings) is None  # the Dockerfile's default: PyTorch's CPU index
    (tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_text("")
    assert image_script.torch_index(settings) == ""  # pip's own configuration: the wheel on disk
    monkeypatch.setenv("TORCH_INDEX", "https://download.pytorch.org/whl/cu128")
    assert image_script.torch_index(settings) == "https://download.pytorch.org/whl/cu128"
    assert image_script.tags("https://download.pytorch.org/whl/cu128")[0].endswith("-cuda")


def test_bad_input_gets_one_line_saying_what_to_do(tmp_path, monkeypatch):
    """No podman or buildah on PATH: exit 2 and one line naming the packages; an unreachable index,
    a missing file:// index and too little disk each raise the one-line error."""
    run = subprocess.run([sys.executable, str(SCRIPT)], env={**os.environ, "PATH": str(tmp_path)},
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "apt-get install podman" in run.stderr, run.stderr
    with pytest.raises(image_script.ImageError, match="cannot reach http://127.0.0.1:9/simple/"):
        image_script.reach("http://127.0.0.1:9/simple/", None)  # the discard port: refused at once
    with pytest.raises(image_script.ImageError, match="does not exist"):
        image_script.reach(f"file://{tmp_path}/none", None)
    monkeypatch.setattr(image_script, "MIN_FREE_GB", 10**9)
    with pytest.raises(image_script.ImageError, match="the build needs 1000000000 GB: free space"):
        image_script.check_disk("podman")


def test_the_k8s_overlays_run_the_image_make_image_tags():
    """cpu-dev runs the CPU image as `make image` tags it; gpu runs the same version's -cuda build."""
    version = image_script.version()
    for overlay, tag in (("cpu-dev", image_script.tags(None)[0]),
                         ("gpu", image_script.tags("https://download.pytorch.org/whl/cu128")[0])):
        images = yaml.safe_load((ROOT / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text())["images"]
        entry = next(i for i in images if i["name"] == "kvcompose-serve")
        assert entry["newName"].rsplit("/", 1)[-1] + ":" + entry["newTag"] == tag
        assert entry["newTag"].startswith(version)


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(ROOT / "scripts/containers.conf"))}
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def image() -> str:
    """`make image`'s own path: a failure to build fails the test, with the script's one-line reason."""
    build = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return build.stdout.strip().splitlines()[-1]


@pytest.mark.image
def test_the_image_serves_answers_from_the_host_runs_as_non_root_and_stops_on_sigterm(image):
    port, name = free_port(), f"kvc-image-test-{secrets.token_hex(4)}"
    podman("run", "--detach", "--name", name, "--publish", f"127.0.0.1:{port}:9000", "--shm-size", "1g", image)
    try:
        started = time.monotonic()
        deadline = started + 300
        while "KVCompose Serve is up" not in (logs := podman("logs", name).stdout):
            state = podman("inspect", name, "--format", "{{.State.Status}}").stdout.strip()
            assert state == "running", logs[-3000:]
            assert time.monotonic() < deadline, "serve did not come up in the image:\n" + logs[-3000:]
            time.sleep(1)
        # The run's API token, where `kvcompose remote` looks for it (the instance of API port 9000).
        up_s = time.monotonic() - started
        token = podman("exec", name, "python", "-c", "from service.serve.instance import api_token_file, state_dir; "
                       "print(api_token_file(state_dir(9000)).read_text())").stdout.strip()
        document = (ROOT / "examples" / "field-guide.md").read_text()
        with KVComposeClient(f"127.0.0.1:{port}", token=token, timeout_s=300) as client:
            cache_id = client.compress(document).cache_id
            answer, stats = client.ask("How much weight can the robot carry?", cache_id=cache_id, max_new_tokens=32)
        answered_s = time.monotonic() - started - up_s
        assert "600" in answer, answer
        assert stats.context_tokens > 500

        # The host's pip configuration reached the build only: no layer keeps it.
        podman("exec", name, "sh", "-c", "! ls /etc/pip.conf /etc/xdg/pip /opt/wheels /opt/pypi 2>/dev/null")

        # Every process in the container, read from inside (/proc): none is root.
        uids = podman("exec", name, "python", "-c", "import glob, re; print('\\n'.join("
                      "p.split('/')[2] + ' ' + re.search(r'Uid:\\s+(\\d+)', open(p).read())[1] "
                      "for p in glob.glob('/proc/[0-9]*/status')))").stdout.split("\n")
        owners = dict(line.split() for line in uids if line)
        assert len(owners) >= 5, owners  # tini, serve, Redis, the store, Ray's processes and replicas
        assert set(owners.values()) == {"1000"}, owners

        stopping = time.monotonic()
        podman("stop", "--time", "30", name, timeout=60)  # SIGTERM, then SIGKILL after 30 s
        took = time.monotonic() - stopping
        exit_code = podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
        output = podman("logs", name)
        logs = output.stdout + output.stderr
        assert exit_code == "0" and took < 30, (exit_code, took, logs[-3000:])
        assert "Stopped." in logs and "Traceback" not in logs, logs[-3000:]
        print(f"\n{image}: up in {up_s:.0f} s, compressed and answered in {answered_s:.0f} s, stopped in {took:.1f} s")
    finally:
        podman("rm", "--force", name, check=False)
