#!/usr/bin/env python3
"""Build the kvcompose-serve image with podman (or buildah) from the Dockerfile that `docker build` takes.

    python3 scripts/image.py        # make image: build it, or reuse it when the Dockerfile and sources are unchanged
    python3 scripts/image.py --tag  # print the tag make image gives (the one k8s/overlays/cpu-dev runs)

BASE (default python:3.11-slim) is never pulled: where it is not in local storage, a Debian 12 stand-in is
built first with mmdebstrap. The host's pip configuration, and the files it names (CA bundle, constraints,
local wheels and indexes), are mounted read-only into the build's steps: pip sees them, no layer keeps them.
Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
NAME = "kvcompose-serve"
DEFAULT_BASE = "python:3.11-slim"
STAND_IN = "localhost/kvcompose-base:bookworm"
STAND_IN_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates,make"
# What the Dockerfile copies (.dockerignore admits the same): a change here means a rebuild.
CONTEXT = ("Dockerfile", ".dockerignore", "pyproject.toml", "MANIFEST.in", "README.md", "Makefile", "proto", "service",
           "workers")
SOURCE_LABEL = "io.kvcompose.source-digest"
MIN_FREE_GB = 12  # base + build stage + image, measured about 8 GB, with room for a rebuild
PYPI = "https://pypi.org/simple/"
DEBIAN = "http://deb.debian.org/debian/dists/bookworm/Release"
BUILD = {"podman": ["build"], "buildah": ["bud", "--isolation", "chroot"]}
EXISTS = {"podman": ["image", "exists"], "buildah": ["inspect", "--type", "image"]}
INSPECT = {"podman": ["image", "inspect"], "buildah": ["inspect", "--type", "image"]}


class ImageError(RuntimeError):
    """What stops the build and what to do about it, in one line."""


def version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def revision() -> str:
    return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def tags(torch_index: str | None) -> list[str]:
    """name:version (what the k8s overlays name) and name:version-g<revision>; GPU builds end in -cuda."""
    cuda = "-cuda" if torch_index and "/cu" in torch_index else ""
    return [f"{NAME}:{version()}{cuda}", f"{NAME}:{version()}{cuda}-g{revision()}"]


def container_tool() -> str:
    for tool in BUILD:
        if shutil.which(tool):
            return tool
    raise ImageError("neither podman nor buildah is installed: apt-get install podman buildah runc mmdebstrap "
                     "(or build with `docker build .` where a Docker engine runs)")


def pip_settings(listing: str) -> dict[str, dict[str, str]]:
    """`pip config list` output as {section: {key: value}}; PIP_* variables (`:env:`) go to [global] and win."""
    settings: dict[str, dict[str, str]] = {}
    lines = sorted(listing.splitlines(), key=lambda line: line.startswith(":env:"))
    for line in filter(None, lines):
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        settings.setdefault("global" if section == ":env:" else section, {})[name] = ast.literal_eval(value)
    return settings


def host_pip_settings() -> dict[str, dict[str, str]]:
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    return pip_settings(listing.stdout) if listing.returncode == 0 else {}


def pip_conf(settings: dict[str, dict[str, str]]) -> str:
    return "".join(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
                   for section, values in settings.items())


def named_paths(settings: dict[str, dict[str, str]]) -> list[str]:
    """The existing host paths the settings name (cert, constraint, find-links, file:// indexes): mounted as-is.
    A file:// index's folder goes with its parent: its pages link to files beside it (../files/)."""
    paths = set()
    for values in settings.values():
        for word in " ".join(values.values()).split():
            path = Path(word.removeprefix("file://"))
            path = path.parent if word.startswith("file://") and path.parent != Path("/") else path
            if path.is_absolute() and path.exists():
                paths.add(str(path))
    return sorted(paths)


def torch_index(settings: dict[str, dict[str, str]]) -> str | None:
    """TORCH_INDEX if set; "" (pip's own configuration) where it finds torch's CPU wheel in a local
    find-links folder, as on our machines; else None: the Dockerfile's default, PyTorch's CPU index."""
    if "TORCH_INDEX" in os.environ:
        return os.environ["TORCH_INDEX"]
    for folder in settings.get("global", {}).get("find-links", "").split():
        if list(Path(folder.removeprefix("file://")).glob("torch-2.13.0+cpu-*.whl")):
            return ""
    return None


def reach(url: str, cafile: str | None) -> None:
    if url.startswith("file://"):
        if not Path(url.removeprefix("file://")).exists():
            raise ImageError(f"the package index {url} does not exist: fix index-url in your pip configuration")
        return
    try:
        urllib.request.urlopen(url, timeout=20, context=ssl.create_default_context(cafile=cafile)).close()
    except OSError as e:
        raise ImageError(f"cannot reach {url} ({e}): the build installs from it; connect this machine to it, or "
                         "name a mirror (index-url in pip.conf / PIP_INDEX_URL; Debian: a mirror in the base)") from e


def check_disk(tool: str) -> None:
    store = Path("/var/lib/containers" if os.geteuid() == 0 else Path.home() / ".local/share/containers")
    while not store.exists():
        store = store.parent
    free_gb = shutil.disk_usage(store).free / 2**30
    if free_gb < MIN_FREE_GB:
        raise ImageError(f"{free_gb:.1f} GB free under {store}, the build needs {MIN_FREE_GB} GB: free space "
                         f"(`{tool} system prune` removes unused images and layers)")


def exists(tool: str, image: str) -> bool:
    return subprocess.run([tool, *EXISTS[tool], image], capture_output=True).returncode == 0


def image_label(tool: str, image: str) -> str | None:
    out = subprocess.run([tool, *INSPECT[tool], image], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    found = json.loads(out.stdout)  # podman: a list of images; buildah: one, its labels in the OCI config
    labels = found[0]["Labels"] if tool == "podman" else found["OCIv1"]["config"].get("Labels")
    return (labels or {}).get(SOURCE_LABEL)


def source_digest(*build_args: str) -> str:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", *CONTEXT], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    h = hashlib.sha256("\0".join(build_args).encode())
    for name in sorted(files):
        if (ROOT / name).is_file():
            h.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
    return h.hexdigest()


def stand_in_base(tool: str) -> str:
    """Debian 12's Python 3.11 with a venv first on PATH: python:3.11-slim's shape (a `python`, a pip that
    may install; Debian's own refuses, PEP 668), made here instead of pulled."""
    if exists(tool, STAND_IN):
        return STAND_IN
    if not shutil.which("mmdebstrap"):
        raise ImageError(f"{DEFAULT_BASE} is not in local storage and mmdebstrap, which builds a stand-in, is not "
                         "installed: apt-get install mmdebstrap, or make image BASE=<a Python 3.11 image you have>")
    print(f"Building the stand-in base {STAND_IN} with mmdebstrap (about a minute)...", flush=True)
    with tempfile.TemporaryDirectory(prefix="kvc-base-") as tmp:
        subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={STAND_IN_PACKAGES}", "bookworm",
                        f"{tmp}/rootfs.tar"], check=True)
        Path(tmp, "Containerfile").write_text(
            "FROM scratch\nADD rootfs.tar /\nRUN python3 -m venv /opt/python\n"
            "ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8\n"
            'CMD ["python"]\n')
        subprocess.run([tool, *BUILD[tool], "--network", "host", "-t", STAND_IN, tmp], check=True)
    return STAND_IN


def build() -> str:
    """Build (or reuse) the image; returns its name:version tag."""
    tool = container_tool()
    settings = host_pip_settings()
    check_disk(tool)
    cafile = settings.get("global", {}).get("cert")
    reach(settings.get("global", {}).get("index-url", PYPI), cafile)
    reach(DEBIAN, cafile)
    base = os.environ.get("BASE") or (DEFAULT_BASE if exists(tool, DEFAULT_BASE) else stand_in_base(tool))
    index = torch_index(settings)
    names, rev = tags(index), revision()
    digest = source_digest(base, str(index))
    if exists(tool, names[0]) and image_label(tool, names[0]) == digest:
        subprocess.run([tool, "tag", names[0], names[1]], check=True)
        print(f"{names[0]} is up to date (Dockerfile and sources unchanged); also tagged {names[1]}")
        return names[0]
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvc-pip-") as tmp:
        Path(tmp, "pip.conf").write_text(pip_conf(settings))
        mounts = [f"{tmp}/pip.conf:/etc/pip.conf:ro"] + [f"{p}:{p}:ro" for p in named_paths(settings)]
        subprocess.run([tool, *BUILD[tool], "--network", "host", "--build-arg", f"BASE={base}",
                        *(["--build-arg", f"TORCH_INDEX={index}"] if index is not None else []),
                        *(a for m in mounts for a in ("--volume", m)),
                        "--label", f"{SOURCE_LABEL}={digest}", "--label", f"org.opencontainers.image.revision={rev}",
                        "--label", f"org.opencontainers.image.version={version()}",
                        *(a for n in names for a in ("-t", n)), "-f", str(ROOT / "Dockerfile"), str(ROOT)], check=True)
    print(f"Built {names[0]} and {names[1]} from {base} in {time.monotonic() - start:.0f} s")
    return names[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", action="store_true", help="print the name:version tag and exit")
    args = parser.parse_args()
    # Our runtime settings (runc, ulimits) without touching the machine's /etc/containers.
    os.environ.setdefault("CONTAINERS_CONF", str(ROOT / "scripts" / "containers.conf"))
    try:
        print(tags(torch_index(host_pip_settings()))[0] if args.tag else build())
    except ImageError as e:
        print(f"make image: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"make image: `{' '.join(map(str, e.cmd[:2]))}` failed (exit {e.returncode}): see its output above",
              file=sys.stderr)
        return e.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
