"""
The mixture-of-experts layer of DiT-MoE: stacked routed SwiGLU experts, a shared SwiGLU
expert, and three routers: token choice (DiT-MoE), expert choice (EC-DiT) and Expert Race
(Race-DiT); also Race-DiT's balance measures.

    layer = MoE(dim=384, num_experts=8, top_k=2, router="race")
    y, aux = layer(x)  # x, y: (N, T, D); aux["router_loss"], aux["load"]

The dispatch has static shapes, compiles with torch.compile(fullgraph=True) and, as "auto"
chooses it, never waits for the GPU: "grouped" (two grouped GEMMs over the assignments
sorted by expert) runs on CPU and in bfloat16 on compute capability 9.x/10.x (H100, H200,
B200); elsewhere PyTorch's grouped GEMM copies its offsets to the host (dispatch="grouped"
there: a host sync per GEMM, 2 per layer forward, 4 per backward), so "padded" runs: every
expert on every token, E/K times the routed FLOPs. Expert choice runs as batched matmuls.

Tests: python -m pytest -q tests/test_moe.py tests/test_routers.py
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

ROUTERS = ("token", "expert", "race")  # DiT-MoE, EC-DiT, Race-DiT
DISPATCHES = ("auto", "grouped", "padded")
EXPERT_RATIO = 4  # routed expert width 4D
SHARED_RATIO = 2  # shared expert width 2D (paper: n_s = 2)
RACE_MOMENTUM = 0.99  # EMA of the race threshold per training forward: ~100 batches


class MoE(nn.Module):
    """forward(x) -> (y, aux): aux["router_loss"] (token: Eq. 5's balance loss, race: the
    similarity loss, else 0), aux["load"], assignments per expert (E,), and with target_dim > 0
    aux["layer_pred"] (N, T, target_dim): Race-DiT's per-layer regularisation, where the router
    is a two-layer MLP whose hidden layer feeds both the gating head and a head predicting the
    diffusion target of each token's patch."""

    def __init__(self, dim, num_experts=8, top_k=2, hidden=None, shared_hidden=None,
                 router="token", balance_alpha=0.05, capacity_factor=1.0, similarity_beta=0.01,
                 dispatch="auto", target_dim=0):
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; choose one of {', '.join(ROUTERS)}")
        if dispatch not in DISPATCHES:
            choices = ", ".join(DISPATCHES)
            raise ValueError(f"unknown dispatch {dispatch!r}; choose one of {choices}")
        hidden = EXPERT_RATIO * dim if hidden is None else hidden
        shared_hidden = SHARED_RATIO * dim if shared_hidden is None else shared_hidden
        if dim % 8 or hidden % 8:  # grouped_mm needs rows aligned to 16 bytes
            raise ValueError(f"MoE widths must be multiples of 8, got dim={dim}, hidden={hidden}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.routing = router
        self.dispatch = dispatch
        self.balance_alpha = balance_alpha  # the paper's 0.05 (Sec. 3.1); official code: 0.01
        self.capacity_factor = capacity_factor
        self.similarity_beta = similarity_beta
        if router == "race":  # NaN: no batch seen yet, the first one sets it
            self.register_buffer("threshold", torch.tensor(float("nan")))
        self.router = Float32Linear(dim, num_experts, bias=False)  # the gating head: E logits
        self.router_mlp = nn.Sequential(Float32Linear(dim, dim), nn.GELU()) if target_dim else None
        self.target_head = nn.Linear(dim, target_dim) if target_dim else None
        # Expert e: gate weights w_gate_up[e, :, :H], up weights w_gate_up[e, :, H:].
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.shared = SwiGLU(dim, shared_hidden) if shared_hidden > 0 else None
        self.reset_parameters()

    def reset_parameters(self):
        # As the official code: nn.Linear's default for the router, Xavier per expert projection.
        self.router.reset_parameters()
        if self.target_head is not None:  # PLR: nn.Linear's defaults too, nothing is zero
            self.router_mlp[0].reset_parameters()
            self.target_head.reset_parameters()
        H, D = self.w_down.shape[1:]
        _uniform_(self.w_gate_up, D, H)
        _uniform_(self.w_down, H, D)
        if self.shared is not None:
            self.shared.reset_parameters()

    def forward(self, x):
        N, T, D = x.shape
        token, expert, weight, aux = self.route(x)  # each (A,)
        hidden = aux.pop("router_hidden")  # (N, T, D): what the gating head read
        if self.target_head is not None:
            aux["layer_pred"] = self.target_head(hidden)  # (N, T, p*p*C): PLR's target prediction
        if self.routing == "race" and self.training:
            # EMA of the smallest winning logit (twice per step if checkpointing recomputes)
            with torch.no_grad():
                smallest_winner = weight.min().float()
                ema = torch.lerp(self.threshold, smallest_winner, 1 - RACE_MOMENTUM)
                self.threshold.copy_(torch.where(self.threshold.isnan(), smallest_winner, ema))
        x = x.reshape(N * T, D)
        if self.routing == "expert":
            y = self.batched_experts(x, token, weight)
        elif self.dispatch_for(x) == "grouped":
            y = self.grouped_experts(x, token, expert, weight)
        else:
            y = self.padded_experts(x, token, expert, weight)
        if self.shared is not None:
            y = y + self.shared(x)  # Eq. 3 plus the shared expert
        ones = torch.ones(expert.shape, device=x.device)
        load = torch.zeros(self.num_experts + 1, device=x.device).index_add_(0, expert, ones)
        aux["load"] = load[:-1]  # race losers (id E) dropped
        return y.reshape(N, T, D), aux

    # Routers ----------------------------------------------------------------

    def route(self, x):
        """Assignments (token, expert, weight), each (A,), and aux: the router's losses and
        "router_hidden", what the gating head read; no side effects. token indexes the N*T rows;
        expert E marks a race loser."""
        with no_autocast(x.device.type):  # routing in float32, autocast or not
            # PLR: the router MLP's hidden layer, else x itself
            hidden = x if self.router_mlp is None else self.router_mlp(x)  # (N, T, D)
            logits = self.router(hidden)  # (N, T, E), float32
            rule = {"token": self.route_token, "expert": self.route_expert, "race": self.route_race}
            token, expert, weight, aux = rule[self.routing](logits)
        return token, expert, weight, aux | {"router_hidden": hidden}

    def route_token(self, logits):
        """Each token's top-k experts, weighted by their softmax probabilities. A = NT * K."""
        scores = logits.reshape(-1, logits.shape[-1]).softmax(dim=-1)  # (NT, E)
        weight, expert = scores.topk(self.top_k, dim=-1)  # (NT, K)
        token = torch.arange(scores.shape[0], device=logits.device).repeat_interleave(self.top_k)
        expert = expert.flatten()  # (A,), token-major like token
        balance = scores.new_zeros(())
        if self.training and self.balance_alpha > 0:
            # Eq. 5: alpha * sum_i f_i P_i; f_i = E * share of assignments, P_i = mean probability
            ones = scores.new_ones(expert.shape)
            f = scores.new_zeros(self.num_experts).index_add_(0, expert, ones)
            f = f * (self.num_experts / expert.numel())
            balance = self.balance_alpha * (f * scores.mean(dim=0)).sum()
        return token, expert, weight.flatten(), {"router_loss": balance}

    def route_expert(self, logits):
        """Per image, each expert takes its C = ceil(f T K / E) most probable tokens (softmax
        weights); listed as (E, N, C). A = N * E * C."""
        N, T, E = logits.shape
        K = self.top_k
        # per image: batch mates never push each other out, and sampling uses the same rule
        capacity = min(T, math.ceil(self.capacity_factor * T * K / E))
        scores = logits.softmax(dim=-1)  # (N, T, E)
        weight, token = scores.transpose(1, 2).topk(capacity, dim=-1)  # (N, E, C), in-image index
        token = token + T * torch.arange(N, device=logits.device)[:, None, None]
        expert = torch.arange(E, device=logits.device)[:, None, None].expand(E, N, capacity)
        token = token.transpose(0, 1).flatten()  # (E, N, C) order
        weight = weight.transpose(0, 1).flatten()
        return token, expert.flatten(), weight, {"router_loss": logits.new_zeros(())}

    def route_race(self, logits):
        """Identity gating. Training: the N*T*K largest of all N*T*E logits win. Inference: a pair
        runs iff its logit beats the threshold (per token); all N*T*E are listed, losers as E."""
        N, T, E = logits.shape
        K = self.top_k
        pair = torch.arange(N * T * E, device=logits.device)  # p = (token p // E, expert p % E)
        if not self.training:
            expert = torch.where(logits.flatten() > self.threshold, pair % E, E)
            return pair // E, expert, logits.flatten(), {"router_loss": logits.new_zeros(())}
        weight, pair = logits.flatten().topk(N * T * K)  # (A,)
        similarity = self.similarity_loss(logits.flatten(0, 1))
        return pair // E, pair % E, weight, {"router_loss": similarity}

    def similarity_loss(self, logits):
        """Race-DiT's router similarity loss penalises correlated experts (Fig. 4: 2-in-4 collapses
        to 1-in-2); the formula is ours: beta * mean over i != j of C_ij^2, C the E x E
        correlation of the logits over tokens. At most beta (default: the official 0.01)."""
        E = logits.shape[1]
        z = (logits - logits.mean(dim=0)) / (logits.std(dim=0, correction=0) + 1e-6)  # (NT, E)
        c = z.T @ z / logits.shape[0]  # (E, E), diagonal 1
        off_diagonal = c.square().sum() - c.diagonal().square().sum()
        return self.similarity_beta * off_diagonal / (E * (E - 1))

    def _apply(self, fn, recurse=True):
        # The race threshold stays float32 under .to(bfloat16): its EMA steps are finer than bf16.
        threshold = self._buffers.get("threshold")
        super()._apply(fn, recurse)
        if threshold is not None and self.threshold.dtype != torch.float32:
            moved = self.threshold.float()  # on the device fn chose
            if not threshold.is_meta and not moved.is_meta:
                moved.copy_(threshold)  # the value before the cast, not its bfloat16 rounding
            self.threshold = moved
        return self

    # Dispatch: each returns sum over (t, e, w) with e < E of w * expert_e(x[t]), x (NT, D)

    def dispatch_for(self, x):
        """self.dispatch; "auto": grouped where it is sync-free, else padded."""
        if self.dispatch != "auto":
            return self.dispatch
        device = x.device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        dtype = torch.bfloat16 if autocast else x.dtype  # grouped_mm autocasts to bfloat16 (below)
        return "grouped" if grouped_mm_is_fast(x.device, dtype) else "padded"

    def grouped_experts(self, x, token, expert, weight):
        """Sort the assignments by expert; two grouped GEMMs over the sorted rows."""
        expert, order = expert.sort(stable=True)
        token = token.index_select(0, order)
        weight = weight.index_select(0, order)
        # offs[e]: assignments to experts <= e; race losers (id E) sort last, past offs[-1]
        expert_ids = torch.arange(self.num_experts, device=x.device)
        offs = torch.searchsorted(expert, expert_ids, right=True, out_int32=True)  # (E,)
        ragged = self.routing == "race" and not self.training
        h = grouped_mm(x.index_select(0, token), self.w_gate_up, offs, ragged)  # (A, 2H)
        gate, up = h.chunk(2, dim=-1)  # each (A, H)
        h = grouped_mm(F.silu(gate) * up, self.w_down, offs, ragged)  # (A, D)
        h = h * weight[:, None].to(h.dtype)  # routing weights are float32
        return h.new_zeros(x.shape).index_add_(0, token, h)

    def padded_experts(self, x, token, expert, weight):
        """Each expert's rows padded to the worst case, all NT tokens: every expert on every
        token, unchosen pairs weighted 0 (exact). Two matmuls, E/K times the routed FLOPs."""
        NT, D = x.shape
        E = self.num_experts
        H = self.w_down.shape[1]
        combine = weight.new_zeros(NT, E + 1).index_put_((token, expert), weight)[:, :E]  # (NT, E)
        w_gate_up = self.w_gate_up.transpose(0, 1).reshape(D, E * 2 * H)  # expert-major columns
        gate, up = (x @ w_gate_up).view(NT, E, 2 * H).chunk(2, dim=-1)  # each (NT, E, H)
        h = F.silu(gate) * up * combine[..., None].to(gate.dtype)  # (NT, E, H)
        return h.reshape(NT, E * H) @ self.w_down.reshape(E * H, D)  # summed over experts

    def batched_experts(self, x, token, weight):
        """Expert choice: E groups of exactly N*C rows, as batched matmuls."""
        E = self.num_experts
        D = x.shape[1]
        h = torch.bmm(x.index_select(0, token).view(E, -1, D), self.w_gate_up)  # (E, N*C, 2H)
        gate, up = h.chunk(2, dim=-1)
        h = torch.bmm(F.silu(gate) * up, self.w_down).view(-1, D)  # (A, D)
        h = h * weight[:, None].to(h.dtype)
        return h.new_zeros(x.shape).index_add_(0, token, h)


class Float32Linear(nn.Linear):
    """A Linear that computes in float32 (float64 stays) whatever its weights' dtype: the router.
    A module call, so FSDP2 gathers its weights in its own hook."""

    def forward(self, x):
        dtype = torch.promote_types(x.dtype, torch.float32)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) without biases; gate and up are one matmul."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)  # [gate ; up] on dim 0
        self.down = nn.Linear(hidden, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        dim, hidden = self.down.weight.shape  # nn.Linear(hidden, dim)
        _uniform_(self.gate_up.weight, dim, hidden)
        _uniform_(self.down.weight, hidden, dim)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def _uniform_(w, fan_in, fan_out):
    # Xavier-uniform as if w were one nn.Linear(fan_in, fan_out), like each official projection
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return nn.init.uniform_(w, -bound, bound)

# ----------------------------------------------------------------------------
# Balance measures (Race-DiT, Table 2)
# ----------------------------------------------------------------------------

def max_violation(counts):
    """MaxVio (Wang et al. 2024): max load / mean load - 1, counts (..., E) -> (...)."""
    counts = counts.float()
    return counts.amax(dim=-1) / counts.mean(dim=-1) - 1


def assignment_mask(token, expert, num_tokens, num_experts):
    """(NT, E) bool, which experts each token used, from a router's (token, expert) lists."""
    mask = torch.zeros(num_tokens, num_experts + 1, dtype=torch.bool, device=token.device)
    mask = mask.index_put_((token, expert), torch.ones_like(token, dtype=torch.bool))
    return mask[:, :num_experts]


def combination_usage(mask):
    """Race-DiT's Fig. 13, mask (NT, E): the share of expert pairs whose sorted, normalised
    co-activation counts stay below 95% cumulatively (~0.95 when used evenly)."""
    m = mask.float()
    i, j = torch.triu_indices(m.shape[1], m.shape[1], offset=1, device=m.device)
    pairs = (m.T @ m)[i, j].sort(descending=True).values  # co-activation counts, largest first
    return ((pairs / pairs.sum()).cumsum(0) < 0.95).float().mean()

# ----------------------------------------------------------------------------
# The grouped GEMM and where it is sync-free
# ----------------------------------------------------------------------------
# torch.compile traces the built-in grouped_mm only in bfloat16: a custom op wraps it.

@torch.library.custom_op("moe::grouped_mm", mutates_args=())
def grouped_mm(a: Tensor, b: Tensor, offs: Tensor, ragged: bool = False) -> Tensor:
    """Rows offs[e-1]:offs[e] of a are group e (int32 ends). b (E, P, Q): a_e @ b[e], (A, Q).
    b (A, Q): a_e.T @ b_e, (E, P, Q). ragged: rows past offs[-1] < A are ignored, out zero."""
    a = a.contiguous()  # the kernel rejects the stride-0 gradients that .sum() hands back
    if b.dim() == 2:  # contract over the grouped rows: a column-major view of a
        out = F.grouped_mm(a.t(), b.contiguous(), offs=offs)  # (E, P, Q)
        # Empty groups must get exact zeros; sm100 leaves non-zero values (pytorch/pytorch#172439).
        empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0  # (E,)
        return torch.where(empty[:, None, None], 0, out)
    out = F.grouped_mm(a, b, offs=offs)
    if ragged:  # rows past offs[-1] are unwritten, maybe NaN (pytorch/pytorch#193633)
        out = torch.where((torch.arange(a.shape[0], device=a.device) < offs[-1])[:, None], out, 0)
    return out


@grouped_mm.register_fake
def _(a, b, offs, ragged=False):
    if b.dim() == 2:
        return a.new_empty(offs.shape[0], a.shape[1], b.shape[1])
    return a.new_empty(a.shape[0], b.shape[2])


def _grouped_mm_backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    grad_a = grouped_mm(grad, b.transpose(1, 2), offs, ctx.ragged)  # (A, P), its tail zero too
    grad_b = grouped_mm(a, grad, offs)  # (E, P, Q)
    return grad_a, grad_b, None, None


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.ragged = inputs[3]


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)
for _device in ("cpu", "cuda"):  # under autocast it runs in bfloat16, like nn.Linear
    torch.library.register_autocast("moe::grouped_mm", _device, torch.bfloat16)

_CAPABILITY = {}  # CUDA device index -> compute capability


@torch.compiler.assume_constant_result  # torch.compile calls it once while tracing
def cuda_capability(index: int) -> tuple:
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


def grouped_mm_is_fast(device, dtype):
    """Whether grouped_mm runs without a host sync. PyTorch 2.13's _grouped_mm_cuda runs CUTLASS
    only in bf16 on capability 9.x/10.x, else a fallback that copies offs to the host and loops
    over groups; CPU has no device to wait for."""
    if device.type == "cpu":
        return True
    if device.type != "cuda" or dtype != torch.bfloat16:
        return False
    return cuda_capability(device.index)[0] in (9, 10)


def no_autocast(device_type):
    """Autocast off where the device type has it (meta has none)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
