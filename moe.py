"""
The mixture-of-experts layer of DiT-MoE: routed SwiGLU experts stored stacked, a
shared SwiGLU expert that every token passes through, token-choice top-k routing
and the expert-level balance loss of the paper (Eq. 5).

Dispatch is dropless and free of host syncs: the A = N*T*K (token, expert,
weight) assignments are sorted by expert and the experts run as two grouped GEMMs
over the sorted rows, so the layer costs about what a dense MLP of the same
active width costs, and it compiles with torch.compile(fullgraph=True).

    layer = MoE(dim=384, num_experts=8, top_k=2)
    y, aux = layer(x)              # x, y: (N, T, D); aux["balance"], aux["counts"]

Tests: python -m pytest -q tests/test_moe.py
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

ROUTERS = ("token",)  # a later issue adds "expert" (EC-DiT) and "race" (Race-DiT)

# ----------------------------------------------------------------------------
# Grouped GEMM
# ----------------------------------------------------------------------------
# torch.compile only traces the built-in grouped_mm for bfloat16, so we wrap it
# in a custom op with its own shape function and backward. We use the wrapper for
# every dtype: one code path, and the kernel that runs is the built-in one anyway.

@torch.library.custom_op("moe::grouped_mm", mutates_args=())
def grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """Rows offs[e-1]:offs[e] of `a` form group e (offs: int32 cumulative ends).
    b of shape (E, P, Q): returns a_e @ b[e] for each group, (A, P) -> (A, Q).
    b of shape (A, Q): returns a_e.T @ b_e for each group, (E, P, Q) (weight gradient)."""
    a = a.contiguous()  # the kernel rejects the stride-0 gradients that .sum() hands back
    if b.dim() == 2:  # contract over the grouped rows: pass a column-major view of a
        return F.grouped_mm(a.t(), b.contiguous(), offs=offs)
    return F.grouped_mm(a, b, offs=offs)


@grouped_mm.register_fake
def _(a, b, offs):
    if b.dim() == 2:
        return a.new_empty(offs.shape[0], a.shape[1], b.shape[1])
    return a.new_empty(a.shape[0], b.shape[2])


def _grouped_mm_backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    grad_a = grouped_mm(grad, b.transpose(1, 2), offs)  # (A, P) = grad_e @ b[e].T
    grad_b = grouped_mm(a, grad, offs)  # (E, P, Q) = a_e.T @ grad_e
    return grad_a, grad_b, None


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)
for _device in ("cpu", "cuda"):  # under autocast it runs in bfloat16, like nn.Linear
    torch.library.register_autocast("moe::grouped_mm", _device, torch.bfloat16)

# ----------------------------------------------------------------------------
# Experts
# ----------------------------------------------------------------------------

def _uniform_(w, fan_in, fan_out):
    # Xavier-uniform as if w were one nn.Linear(fan_in, fan_out), which is how the
    # official code initialises each separate gate/up/down projection.
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return nn.init.uniform_(w, -bound, bound)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) without biases; gate and up are one matmul."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)  # [gate ; up] on dim 0
        self.down = nn.Linear(hidden, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        hidden, dim = self.down.weight.shape[1], self.down.weight.shape[0]
        _uniform_(self.gate_up.weight, dim, hidden)
        _uniform_(self.down.weight, hidden, dim)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class MoE(nn.Module):
    """Routed experts + shared expert. Returns (y, aux) with aux["balance"], the
    Eq. 5 loss (zero outside training), and aux["counts"], assignments per expert."""

    def __init__(self, dim, num_experts=8, top_k=2, hidden=None, shared_hidden=None,
                 router="token", balance_alpha=0.05, renormalize=False):
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; choose one of {', '.join(ROUTERS)}")
        hidden = 4 * dim if hidden is None else hidden
        shared_hidden = 2 * dim if shared_hidden is None else shared_hidden
        if dim % 8 or hidden % 8:  # grouped_mm needs rows aligned to 16 bytes
            raise ValueError(f"MoE widths must be multiples of 8, got dim={dim}, hidden={hidden}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.num_experts, self.top_k = num_experts, top_k
        self.routing, self.renormalize = router, renormalize
        # The paper uses alpha = 0.05 (Sec. 3.1); the official code hard-codes 0.01.
        self.balance_alpha = balance_alpha
        self.router = nn.Linear(dim, num_experts, bias=False)
        # Expert e: gate weights w_gate_up[e, :, :H], up weights w_gate_up[e, :, H:].
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.shared = SwiGLU(dim, shared_hidden) if shared_hidden > 0 else None
        self.reset_parameters()

    def reset_parameters(self):
        # The official init: nn.Linear's default for the router, Xavier for each expert projection.
        self.router.reset_parameters()
        H, D = self.w_down.shape[1:]
        _uniform_(self.w_gate_up, D, H)
        _uniform_(self.w_down, H, D)
        if self.shared is not None:
            self.shared.reset_parameters()

    def route_token(self, x):
        """Token choice: each token takes its top-k experts, weighted by their raw
        softmax probabilities. Returns the flat assignment list (token, expert,
        weight), each (A,) with A = NT * K, and the router's losses."""
        scores = F.linear(x.float(), self.router.weight.float()).softmax(dim=-1)  # (NT, E)
        weight, expert = scores.topk(self.top_k, dim=-1)  # (NT, K)
        if self.renormalize:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)
        expert = expert.flatten()
        balance = scores.new_zeros(())
        if self.training and self.balance_alpha > 0:
            # Eq. 5: f_i = E * (share of the NT * K assignments that went to expert i),
            # P_i = mean probability of expert i over tokens; loss = alpha * sum_i f_i P_i.
            f = scores.new_zeros(self.num_experts).index_add_(0, expert, scores.new_ones(expert.shape))
            f = f * (self.num_experts / expert.numel())
            balance = self.balance_alpha * (f * scores.mean(dim=0)).sum()
        return token, expert, weight.flatten(), {"balance": balance}

    def experts(self, x, token, expert, weight):
        """y[t] = shared(x[t]) + sum over assignments (t, e, w) of w * expert_e(x[t]),
        every input (A,). Returns y (NT, D) and the number of assignments per expert (E,)."""
        expert, order = expert.sort(stable=True)  # group assignments by expert
        token, weight = token[order], weight[order]
        # offs[e] = number of assignments to experts <= e: the group ends grouped_mm wants;
        # the last one is A, so no row of the sorted block is left uninitialised.
        experts = torch.arange(self.num_experts, device=x.device)
        offs = torch.searchsorted(expert, experts, right=True, out_int32=True)  # (E,)
        counts = torch.diff(offs, prepend=offs.new_zeros(1))
        h = grouped_mm(x.index_select(0, token), self.w_gate_up, offs)  # (A, 2H)
        gate, up = h.chunk(2, dim=-1)
        h = grouped_mm(F.silu(gate) * up, self.w_down, offs)  # (A, D)
        h = h * weight[:, None].to(h.dtype)  # routing weights are float32
        y = self.shared(x) if self.shared is not None else h.new_zeros(x.shape)  # (NT, D)
        return y.index_add_(0, token, h), counts

    def forward(self, x):
        N, T, D = x.shape
        x = x.reshape(N * T, D)
        token, expert, weight, aux = getattr(self, "route_" + self.routing)(x)  # each (A,)
        y, counts = self.experts(x, token, expert, weight)  # Eq. 3 + shared, (NT, D)
        aux["counts"] = counts.detach().float()
        return y.reshape(N, T, D), aux
