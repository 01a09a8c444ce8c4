"""bench.py --quick runs end to end and prints every section (no timing assertions)."""
import subprocess
import sys
from pathlib import Path


def test_bench_quick_runs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "bench.py", "--quick", "--no-compile", "--rounds", "1",
                          "--json", str(tmp_path / "b.json")], cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    for row in ["matmul", "MoE layer float32", "MoE layer bfloat16", "train step T/2-4E2A",
                "sampling T/2-4E2A", "Frechet d=256"]:
        assert row in out.stdout
    assert (tmp_path / "b.json").read_text().count("MoE layer") == 6  # moe, moe with new routing, loop; two dtypes
