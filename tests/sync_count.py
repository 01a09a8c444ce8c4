"""
CountSyncs: record every op that would make the host wait for the GPU, on a machine without one.

Run the code on tensors of a fake "cuda" device (or on "meta") and count what it does:

    from torch._subclasses.fake_tensor import FakeTensorMode
    from sync_count import CountSyncs
    with FakeTensorMode():
        x = torch.randn(2, 4, 8, 8, device="cuda")
        with CountSyncs() as c:
            y = f(x)
    assert c.events == [], c.report()

c.events holds (op name, reason) for
- a copy between devices (or any op with operands on two devices): from pageable host memory
  or to the host, CUDA copies synchronously, so the host waits for the stream to drain;
- aten._local_scalar_dense: .item(), float(t), int(t), bool(t), tolist() read a device value;
- ops whose output shape depends on tensor values, so the host must read a count back first:
  nonzero (torch.where(c), argwhere), masked_select, unique, unique_consecutive, bincount,
  repeat_interleave without output_size, boolean-mask indexing x[mask] / x[mask] = v (it runs
  nonzero), and equal / is_nonzero, which return a Python bool.
The same ops on CPU tensors are recorded too (not the copies: there is one device): the code
is device-agnostic, so what reads a value back on CPU syncs on a GPU.

c.async_copies holds the cross-device copies made with non_blocking=True: from pinned memory
these do not block the host, so they are kept apart from the events.
c.host_outputs holds the ops that made a CPU tensor, to find per-step host work in code that
should run on the device alone (a 0-dim CPU tensor of torch.tensor(2.0) counts; the Python
number of x * 2.0 makes none).

Not seen: syncs inside a kernel below the dispatcher (e.g. CUDA masked_fill_ with a 0-dim
device tensor as the value calls .item() in C++), and in a CPU build of torch the Python
indexing binding (x[i], x[:, :3], x[mask]), t.cuda(), t.to("cuda") and copy_ between devices
refuse fake CUDA tensors before dispatch ("PyTorch is not linked with support for cuda
devices"): such code fails loudly rather than being counted. Code can use narrow, split,
index_select and .to(x.device) instead, or run on the meta device, which has neither limit.
"""
import traceback

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves

import moe

aten = torch.ops.aten

# copy ops: any device change is a transfer, a 0-dim source included
COPIES = {aten._to_copy, aten.copy_, aten._copy_from, aten._copy_from_and_resize}
# output shape or a Python value read from the device
DATA_DEPENDENT = {
    aten._local_scalar_dense: ".item() reads a device value",
    aten.nonzero: "data-dependent shape",
    aten.masked_select: "data-dependent shape",
    aten._unique: "data-dependent shape",
    aten._unique2: "data-dependent shape",
    aten.unique_dim: "data-dependent shape",
    aten.unique_consecutive: "data-dependent shape",
    aten.bincount: "data-dependent shape",
    aten.equal: "returns a Python bool",
    aten.is_nonzero: "returns a Python bool",
}
# ops that take a list of index tensors: a boolean one is a mask, turned into indices by nonzero
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _tensors(tree):
    return [a for a in tree_flatten(tree)[0] if isinstance(a, torch.Tensor)]


def _host_scalar(t):
    return t.device.type == "cpu" and t.dim() == 0


def _caller():
    """file:line of the innermost frame outside torch and this file: where the op was asked for."""
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and not frame.filename.endswith("sync_count.py"):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


class CountSyncs(TorchDispatchMode):
    """A dispatch mode recording host syncs in .events, see the module docstring."""

    def __init__(self):
        super().__init__()
        self.events = []        # (op name, reason)
        self.where = []         # file:line of each event
        self.async_copies = []  # (op name, "src -> dst") of non_blocking copies
        self.host_outputs = []  # op names that made a CPU tensor

    def _record(self, func, reason):
        self.events.append((str(func), reason))
        self.where.append(_caller())

    def report(self):
        """One line per event, with where it was asked for."""
        return "\n".join(f"{op}: {why} at {at}" for (op, why), at in zip(self.events, self.where))

    def _check_copy(self, func, args, kwargs):
        """Record a copy whose source and destination devices differ (before running it, so that
        a copy the fake device refuses is recorded too)."""
        packet = func.overloadpacket
        if packet is aten._to_copy:
            src = args[0]
            dst = kwargs.get("device") or src.device  # _to_copy(src, dtype=, device=, ...)
        elif packet is aten.copy_:
            src = args[1]
            dst = args[0].device  # copy_(dst, src, non_blocking)
        else:
            src = args[0]
            dst = args[1].device  # _copy_from(src, dst, non_blocking)
        if torch.device(dst) == src.device:
            return
        non_blocking = kwargs.get("non_blocking", False)
        if packet is not aten._to_copy and len(args) > 2:
            non_blocking = args[2]
        change = f"{src.device} -> {dst}"
        if non_blocking:
            self.async_copies.append((str(func), change))
        else:
            self._record(func, f"copy {change}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        # what can be judged from the inputs is recorded first: the fake device raises on some
        if packet in DATA_DEPENDENT:
            self._record(func, DATA_DEPENDENT[packet])
        if packet is aten.repeat_interleave and func._overloadname != "self_int":
            if kwargs.get("output_size") is None:
                self._record(func, "data-dependent shape (repeats without output_size)")
        if packet in INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            if any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices):
                self._record(func, "boolean-mask indexing runs nonzero")
        if packet in COPIES:
            self._check_copy(func, args, kwargs)
        # a 0-dim CPU operand of a device op is read on the host as a scalar: no copy
        inputs = [t for t in _tensors((args, kwargs)) if not _host_scalar(t)]
        devices = sorted({str(t.device) for t in inputs})
        if packet not in COPIES and len(devices) > 1:
            self._record(func, f"operands on {', '.join(devices)}")
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        made_on = sorted({str(t.device) for t in outputs})
        if packet not in COPIES and len(devices) == 1 and made_on and made_on != devices:
            self._record(func, f"operands on {devices[0]}, output on {', '.join(made_on)}")
        if any(t.device.type == "cpu" for t in outputs):
            self.host_outputs.append(str(func))
        return out


class FakeCudaBindings(TorchFunctionMode):
    """Run the Tensor methods whose bindings take a device guard on fake CUDA tensors, with the
    tensors labelled CPU during the call (none of them is affected by autocast)."""
    GUARDED = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.to, torch.Tensor.float,
               torch.Tensor.bfloat16, torch.Tensor.half, torch.Tensor.double, torch.Tensor.long,
               torch.Tensor.int, torch.Tensor.bool, torch.Tensor.contiguous, torch.Tensor.copy_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.pin_memory and isinstance(args[0], FakeTensor):
            return args[0]  # fake host memory: as good as pinned (the CPU build cannot pin)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        fake_cuda = [t for t in tensors if isinstance(t, FakeTensor) and t.device.type == "cuda"]
        moves = func is torch.Tensor.to and any(
            isinstance(a, (str, torch.device)) for a in tree_leaves((args[1:], kwargs)))
        if func not in self.GUARDED or not fake_cuda or moves or len(fake_cuda) < len(tensors):
            return func(*args, **kwargs)  # as on a GPU: a device change is dispatched (and recorded)
        cpu, cuda = torch.device("cpu"), fake_cuda[0].device
        for t in fake_cuda:
            t.fake_device = cpu
        try:
            out = func(*args, **kwargs)
        finally:
            for t in fake_cuda:
                t.fake_device = cuda
        for t in tree_leaves(out):
            if isinstance(t, FakeTensor):
                t.fake_device = cuda
        return out


class RecordOps(CountSyncs):
    """CountSyncs that also keeps the names of the ops it saw."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.name())
        return super().__torch_dispatch__(func, types, args, kwargs)


def pretend_gpu(monkeypatch, capability):
    """Make moe see a CUDA device of this compute capability; returns the list of queries."""
    queries = []
    monkeypatch.setattr(moe, "_CAPABILITY", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: queries.append(i) or capability)
    return queries


def pretend_cuda_autocast(monkeypatch):
    """torch.autocast("cuda") checks for a device when it is made; then it runs on fake CUDA
    tensors as on one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
