"""The store's capacity and cluster-throughput benchmarks run from a clean checkout and print their
figures (the numbers themselves are for docs/store.md, not for asserting: the machines are shared)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(module: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", f"service.bench.{module}", *args], cwd=ROOT, check=True,
                          capture_output=True, text=True, timeout=600).stdout


def test_capacity_model_matches_the_known_kv_size_of_smollm2():
    out = run("capacity", "--tokens", "1024", "--ratios", "0,0.5")
    smollm2 = next(line for line in out.splitlines() if "SmolLM2" in line and "| float16 |" in line)
    assert "| 23,040 |" in smollm2  # 30 layers x 3 KV heads x 64 dims x (K, V) x 2 bytes
    assert "Redis memory per stored byte" in out


def test_cluster_throughput_compares_one_redis_with_a_cluster():
    out = run("cluster_throughput", "--entries", "3", "--mib", "1", "--parallel", "1,3", "--repeats", "1")
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and "x" not in line]
    assert [r[0] for r in rows] == ["1", "3"] and all(float(r[3]) > 0 for r in rows)

