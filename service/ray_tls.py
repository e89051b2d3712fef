"""Sign this Ray pod's own TLS certificate, in an init container (k8s/components/ray-tls).

With ``RAY_USE_TLS=1`` Ray checks the peer it dials against the names in its certificate, and Ray
pods dial each other by pod IP (the workers dial the head by its Service's DNS name). No cert-manager
Certificate can name a pod IP, so each pod signs its own: the init container mounts the Ray CA's
Secret (cert-manager's layout: ``tls.crt``, ``tls.key``) and writes ``tls.crt``, ``tls.key`` and
``ca.crt`` into a directory the Ray containers share. Only the init container sees the CA's key.

    python -m service.ray_tls --ca-dir /etc/kvcompose/ray-ca --out /etc/kvcompose/ray/tls \\
        "$POD_IP" 127.0.0.1 localhost "*.$POD_NAMESPACE.svc.cluster.local"
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import re
import sys
from pathlib import Path

from service.local_ca import LocalCA

# A DNS name, optionally a wildcard in its first label; anything else (an unexpanded "$(POD_IP)",
# an empty downward-API value, a mistyped IP address) is refused rather than signed.
_DNS_NAME = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_name(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        if _DNS_NAME.match(name) and not re.fullmatch(r"[0-9.]+", name):  # no all-numeric top label
            return name
    raise argparse.ArgumentTypeError(f"not an IP address or DNS name: {name!r}")


def sign(ca_dir: Path, out: Path, names: list[str], days: int) -> Path:
    """This pod's certificate for ``names`` in ``out``, valid ``days`` but never past the CA itself."""
    ca = LocalCA.load(ca_dir)
    left = ca.cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    if left.days < 1:
        raise ValueError(f"the Ray CA in {ca_dir} expires within a day ({ca.cert.not_valid_after_utc})")
    return Path(ca.issue(out, tuple(names), days=min(days, left.days)).cert_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.ray_tls", description=__doc__.splitlines()[0])
    parser.add_argument("--ca-dir", type=Path, required=True, help="the Ray CA's Secret (tls.crt, tls.key)")
    parser.add_argument("--out", type=Path, required=True, help="where tls.crt, tls.key and ca.crt go")
    parser.add_argument("--days", type=int, default=365, help="validity (capped at the CA's own)")
    parser.add_argument("names", nargs="+", type=check_name, help="IP addresses and DNS names to certify")
    args = parser.parse_args(argv)
    try:
        cert = sign(args.ca_dir, args.out, args.names, args.days)
    except (OSError, ValueError) as err:
        print(f"ray_tls: {err}", file=sys.stderr)
        return 1
    print(f"ray_tls: wrote {cert} for {', '.join(args.names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
