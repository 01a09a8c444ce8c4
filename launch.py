"""
How every script here starts and stops: the CPU thread policy, torchrun's process group and
device, the number formats, and user errors (one line, printed once, every process exits).

    import launch                       # first import of a script: before torch loads OpenMP
    rank, world, device = launch.setup("auto")
    launch.fail("--lr must be positive")
"""
import os

# OpenMP threads spin while they wait for work; on cores shared with other jobs that spinning
# steals the cores (measured: the demo at 11 s/step instead of 2.5 s on a busy 2-core machine).
# A passive wait costs small CPU models some speed on idle cores (the demo model: 4.2 steps/s
# against 5.8) and saves them from crawling on busy ones; GPU work does not notice. It must be
# set before torch loads OpenMP, so every script imports this module before torch; a user's own
# setting (OMP_WAIT_POLICY=ACTIVE for the fastest CPU runs on idle cores) wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# A sharded checkpoint of the 16B model gathers its EMA on rank 0 while the others wait in
# the next collective: NCCL's default 10-minute watchdog would kill the job.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


# ----------------------------------------------------------------------------
# User errors
# ----------------------------------------------------------------------------

def fail(msg, alone=False):
    """Bad input: `error: msg` on stderr, exit status 1, no traceback. Under torchrun, where every
    process meets the same error, rank 0 prints it and fails, the others leave quietly (torchrun
    then reports one failed process, not one per rank). alone: only this process met it (e.g. a
    file it cannot read mid-run); it prints and fails, and torchrun stops the others."""
    rank = int(os.environ.get("RANK", 0))
    if rank == 0 or alone:
        print(f"error: {f'rank {rank}: ' if rank and alone else ''}{msg}", file=sys.stderr,
              flush=True)
    if dist.is_initialized() and not alone:
        dist.destroy_process_group()
    raise SystemExit(1 if rank == 0 or alone else 0)


def fail_if_any(error):
    """Collective: every process passes its own error message or None; if any has one, all
    stop together and rank 0 prints the first (e.g. a node whose disk lacks a file)."""
    if not dist.is_initialized():
        if error:
            fail(error)
        return
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next(((r, e) for r, e in enumerate(errors) if e), None)
    if first:
        fail(first[1] if first[0] == 0 else f"rank {first[0]}: {first[1]}")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line through fail(), not a usage block."""

    def error(self, message):
        fail(message)


def ranged(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: `kind` (int or float) within [low, high] (open ends as flagged), finite."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an int' if kind is int else 'a number'}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            bounds = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{text} is not in {bounds}")
        return value
    return parse


positive_int = ranged(int, 1)
nonnegative_int = ranged(int, 0)
positive_float = ranged(float, 0, low_open=True)
nonnegative_float = ranged(float, 0)


def writable_dir(path):
    """Create the folder path if needed and prove it takes a file, or fail with one line."""
    path = Path(path)
    probe = path / f".write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as e:
        fail(f"cannot write to {path}: {e.strerror or e}")
    return path


# ----------------------------------------------------------------------------
# Processes and devices
# ----------------------------------------------------------------------------

def keep_freed_memory():
    """CPU training on Linux: glibc returns every freed block over 32 MB to the OS, and the next
    step faults it back in page by page (~200k faults per S/2-8E2A step, 15-20% of its time).
    Raising the mmap and trim thresholds (mallopt codes -3 and -1) keeps those blocks for reuse."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks under 1 GB come from the heap
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: give memory back only past 1 GB free at the top


def add_device_flags(group, precision_help):
    """--device and --precision, the same two flags in train.py and sample.py (setup() checks
    the device, bf16_default() reads the precision)."""
    group.add_argument("--device", default="auto",
                       help="auto (a GPU when there is one), cuda or cpu")
    group.add_argument("--precision", choices=("bf16", "fp32"), help=precision_help)


def setup(device="auto"):
    """(rank, world, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a
    single process. device: "auto" (the GPU when there is one), "cuda" or "cpu"."""
    if device not in ("auto", "cuda", "cpu"):
        fail(f"unknown device {device!r}; choose auto, cuda or cpu")
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but this torch sees no CUDA GPU")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # the global rank names no GPU on node 2
    if cuda and local_rank >= torch.cuda.device_count():
        fail(f"local rank {local_rank} but only {torch.cuda.device_count()} GPU(s) on this node: "
             "lower --nproc_per_node")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        # fp32 matmuls and convolutions on tensor cores (TF32), the current API of both switches
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        keep_freed_memory()
    if "RANK" in os.environ:
        # device_id binds NCCL's communicator to this GPU now (no lazy init, no barrier warning)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT,
                                device_id=device if cuda else None)
    return rank, world, device


def bf16_default(device, precision):
    """True to compute in bfloat16: precision "bf16" or "fp32", or None for the default, bf16 on
    GPUs (tensor cores, and the fast grouped GEMM of moe.py) and fp32 on CPUs."""
    return device.type == "cuda" if precision is None else precision == "bf16"
