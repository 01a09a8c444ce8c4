"""bench.py --quick runs end to end and prints every section (no timing assertions); bad
arguments end in one line before any benchmark runs."""
import subprocess
import sys
from pathlib import Path

import pytest

import bench

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_runs(tmp_path):
    out = subprocess.run([sys.executable, "bench.py", "--quick", "--no-compile", "--rounds", "1", "--device",
                          "cpu", "--json", str(tmp_path / "b.json")], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    for row in ["matmul", "MoE layer float32", "MoE layer bfloat16", "train step T/2-4E2A",
                "sampling T/2-4E2A", "Frechet d=256", "moe padded"]:
        assert row in out.stdout
    # moe, moe with new routing, loop, moe padded; two dtypes
    assert (tmp_path / "b.json").read_text().count("MoE layer") == 8


def test_bench_device_it_does_not_have():
    # cuda:99 exists on no machine: one line, exit status 1, before any benchmark
    out = subprocess.run([sys.executable, "bench.py", "--quick", "--device", "cuda:99"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: --device cuda:99: not available")


@pytest.mark.parametrize("argv, message", [
    (["--device", "banana"], "error: --device banana: not available"),
    (["--rounds", "0"], "error: argument --rounds: 0 is not in [1, inf]"),
    (["--rounds", "-3"], "error: argument --rounds: -3 is not in [1, inf]"),
    (["--rounds", "two"], "error: argument --rounds: 'two' is not an int"),
    (["--only", "everything"], "error: argument --only: invalid choice: 'everything'"),
])
def test_bench_bad_arguments(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(bench, "matmul_tflops", lambda *a: pytest.fail("benchmarked before the check"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick"] + argv)
    err = capsys.readouterr().err  # launch.fail: one line on stderr, status 1
    assert e.value.code == 1 and err.startswith(message) and err.count("\n") == 1, err


@pytest.mark.cuda
def test_bench_quick_runs_on_the_gpu(tmp_path):
    # the GPU tier (python -m pytest -m cuda): every section on the GPU, bf16 grouped GEMM included
    if not __import__("torch").cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = subprocess.run([sys.executable, "bench.py", "--quick", "--rounds", "1", "--device", "cuda"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MoE layer bfloat16" in out.stdout and "train step" in out.stdout
