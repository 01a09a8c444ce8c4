"""
The mixture-of-experts layer of DiT-MoE: routed SwiGLU experts stored stacked, a
shared SwiGLU expert that every token passes through, and three routers:
  token   token-choice top-k with the balance loss of DiT-MoE (Eq. 5);
  expert  expert choice of EC-DiT (Sun et al. 2024): each expert picks its tokens;
  race    Expert Race of Race-DiT (Yuan et al. 2025): top-k over all token-expert
          pairs, identity gating, an EMA threshold at inference, the router
          similarity loss. Its per-layer regularisation lives in model.py.
Also the balance measures of Race-DiT: max_violation and combination_usage.

Dispatch is free of host syncs: a router returns A (token, expert, weight)
assignments, they are sorted by expert and the experts run as two grouped GEMMs
over the sorted rows, so the layer costs about what a dense MLP of the same
active width costs, and it compiles with torch.compile(fullgraph=True).

    layer = MoE(dim=384, num_experts=8, top_k=2, router="race")
    y, aux = layer(x)              # x, y: (N, T, D); aux["router_loss"], aux["counts"]

Tests: python -m pytest -q tests/test_moe.py tests/test_routers.py
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

ROUTERS = ("token", "expert", "race")  # DiT-MoE, EC-DiT, Race-DiT
EXPERT_RATIO, SHARED_RATIO = 4, 2  # routed expert width 4D; shared expert width 2D (paper: n_s = 2)
RACE_MOMENTUM = 0.99  # EMA of the race threshold per training forward: a memory of ~100 batches
DISPATCHES = ("auto", "grouped", "padded")

_CAPABILITY = {}  # CUDA device index -> compute capability, queried once


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing and keeps the result
def cuda_capability(index: int) -> tuple:
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


def no_autocast(device_type):
    """Autocast off on this device type (nothing to turn off where it has none: meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def grouped_mm_is_fast(device, dtype):
    """Whether torch's grouped GEMM runs without a host sync. PyTorch 2.13's _grouped_mm_cuda takes
    its CUTLASS kernel only for bfloat16 on compute capability 9.x or 10.x (H100/H200, B200); else
    _grouped_mm_fallback copies offs to the host (a sync) and runs one mm per group. On CPU there
    is no device to wait for."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and dtype == torch.bfloat16 and cuda_capability(device.index)[0] in (9, 10)


# ----------------------------------------------------------------------------
# Grouped GEMM
# ----------------------------------------------------------------------------
# torch.compile only traces the built-in grouped_mm for bfloat16, so we wrap it
# in a custom op with its own shape function and backward. We use the wrapper for
# every dtype: one code path, and the kernel that runs is the built-in one anyway.

@torch.library.custom_op("moe::grouped_mm", mutates_args=())
def grouped_mm(a: Tensor, b: Tensor, offs: Tensor, ragged: bool = False) -> Tensor:
    """Rows offs[e-1]:offs[e] of `a` form group e (offs: int32 cumulative ends).
    b of shape (E, P, Q): returns a_e @ b[e] for each group, (A, P) -> (A, Q).
    b of shape (A, Q): returns a_e.T @ b_e for each group, (E, P, Q) (weight gradient).
    ragged: offs[-1] may be < A (race inference); rows past it are ignored, and zero in the output."""
    a = a.contiguous()  # the kernel rejects the stride-0 gradients that .sum() hands back
    if b.dim() == 2:  # contract over the grouped rows: pass a column-major view of a
        out = F.grouped_mm(a.t(), b.contiguous(), offs=offs)  # (E, P, Q)
        # An empty group's slice must be exactly zero; on sm100 the kernel leaves non-zero values
        # there (pytorch/pytorch#172439).
        empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0  # (E,)
        return torch.where(empty[:, None, None], 0, out)
    out = F.grouped_mm(a, b, offs=offs)
    if ragged:  # the kernel never writes rows past offs[-1] (pytorch/pytorch#193633): garbage, maybe
        # NaN, so where, not a multiply by a zero weight
        out = torch.where((torch.arange(a.shape[0], device=a.device) < offs[-1])[:, None], out, 0)
    return out


@grouped_mm.register_fake
def _(a, b, offs, ragged=False):
    if b.dim() == 2:
        return a.new_empty(offs.shape[0], a.shape[1], b.shape[1])
    return a.new_empty(a.shape[0], b.shape[2])


def _grouped_mm_backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    grad_a = grouped_mm(grad, b.transpose(1, 2), offs, ctx.ragged)  # (A, P) = grad_e @ b[e].T
    grad_b = grouped_mm(a, grad, offs)  # (E, P, Q) = a_e.T @ grad_e
    return grad_a, grad_b, None, None


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.ragged = inputs[3]


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
    """Routed experts + shared expert. Returns (y, aux) with aux["router_loss"] (token choice: the
    Eq. 5 balance loss; race: the similarity loss; expert choice and outside training: zero) and
    aux["counts"], assignments per expert (E,)."""

    def __init__(self, dim, num_experts=8, top_k=2, hidden=None, shared_hidden=None,
                 router="token", balance_alpha=0.05, renormalize=False, capacity_factor=1.0,
                 similarity_beta=0.01, dispatch="auto"):
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; choose one of {', '.join(ROUTERS)}")
        if dispatch not in DISPATCHES:
            raise ValueError(f"unknown dispatch {dispatch!r}; choose one of {', '.join(DISPATCHES)}")
        self.dispatch = dispatch
        hidden = EXPERT_RATIO * dim if hidden is None else hidden
        shared_hidden = SHARED_RATIO * dim if shared_hidden is None else shared_hidden
        if dim % 8 or hidden % 8:  # grouped_mm needs rows aligned to 16 bytes
            raise ValueError(f"MoE widths must be multiples of 8, got dim={dim}, hidden={hidden}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.num_experts, self.top_k = num_experts, top_k
        self.router_kind, self.renormalize = router, renormalize
        # The paper uses alpha = 0.05 (Sec. 3.1); the official code hard-codes 0.01.
        self.balance_alpha = balance_alpha
        self.capacity_factor, self.similarity_beta = capacity_factor, similarity_beta
        if router == "race":  # NaN: no batch seen yet, the first one sets it
            self.register_buffer("threshold", torch.tensor(float("nan")))
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

    def _apply(self, fn, recurse=True):
        # Module.to(torch.bfloat16) casts every floating buffer; the race threshold stays float32:
        # it is compared with float32 logits, and its EMA steps (1% of a gap) are finer than
        # bfloat16's 8-bit mantissa resolves.
        threshold = self._buffers.get("threshold")
        super()._apply(fn, recurse)
        if threshold is not None and self.threshold.dtype != torch.float32:
            moved = self.threshold.float()  # on the device fn chose
            if not threshold.is_meta and not moved.is_meta:
                moved.copy_(threshold)  # the value before the cast, not its bfloat16 rounding
            self.threshold = moved
        return self

    def route(self, x):
        """The configured router on x (N, T, D), by its training or its inference rule (self.training);
        no side effects. Returns the flat assignment list (token, expert, weight), each (A,), token
        indexing the N*T rows, and the router's losses. Expert id E: a race candidate not selected."""
        with no_autocast(x.device.type):  # routing decisions in float32, autocast or not
            dtype = torch.promote_types(x.dtype, torch.float32)  # float64 stays (tests)
            s = F.linear(x.to(dtype), self.router.weight.to(dtype))  # (N, T, E) router logits
            rule = {"token": self.route_token, "expert": self.route_expert, "race": self.route_race}
            return rule[self.router_kind](s)

    def route_token(self, s):
        """Token choice: each token takes its top-k experts, weighted by their raw softmax
        probabilities. A = NT * K."""
        scores = s.reshape(-1, s.shape[-1]).softmax(dim=-1)  # (NT, E)
        weight, expert = scores.topk(self.top_k, dim=-1)  # (NT, K)
        if self.renormalize:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        token = torch.arange(scores.shape[0], device=s.device).repeat_interleave(self.top_k)  # (A,)
        expert = expert.flatten()  # (A,), token-major like token
        balance = scores.new_zeros(())
        if self.training and self.balance_alpha > 0:
            # Eq. 5: f_i = E * (share of the NT * K assignments that went to expert i),
            # P_i = mean probability of expert i over tokens; loss = alpha * sum_i f_i P_i.
            f = scores.new_zeros(self.num_experts).index_add_(0, expert, scores.new_ones(expert.shape))  # (E,)
            f = f * (self.num_experts / expert.numel())
            balance = self.balance_alpha * (f * scores.mean(dim=0)).sum()
        return token, expert, weight.flatten(), {"router_loss": balance}

    def route_expert(self, s):
        """Expert choice (EC-DiT, after Zhou et al. 2022): in each image, each expert takes the
        `capacity` = ceil(capacity_factor * T * K / E) tokens with the highest softmax probability,
        weighted by it; a token gets 0..E experts. A = N * E * capacity. Balanced by construction."""
        (N, T, E), K = s.shape, self.top_k
        # Within each image, not across the batch: across it, one sample's tokens would push another's
        # out, leaking between batch mates. Per image, the training rule is also the sampling rule.
        capacity = min(T, math.ceil(self.capacity_factor * T * K / E))
        scores = s.softmax(dim=-1)  # (N, T, E)
        weight, token = scores.transpose(1, 2).topk(capacity, dim=-1)  # (N, E, capacity), index in its image
        token = token + T * torch.arange(N, device=s.device)[:, None, None]
        expert = torch.arange(E, device=s.device)[:, None, None].expand(E, N, capacity)
        # listed expert by expert, (E, N, capacity), for batched_experts
        token, weight = token.transpose(0, 1), weight.transpose(0, 1)
        return token.flatten(), expert.flatten(), weight.flatten(), {"router_loss": s.new_zeros(())}

    def route_race(self, s):
        """Expert Race (Race-DiT): the logits are the gates (identity gating, no softmax). Training: the
        N*T*K largest of the batch's N*T*E logits win, A = N*T*K (forward() keeps an EMA of the smallest
        winner as the threshold). Inference: pair (t, e) runs iff s > threshold, a per-token rule, so a
        sample never depends on its batch mates; A = N*T*E candidates."""
        (N, T, E), K = s.shape, self.top_k
        pair = torch.arange(N * T * E, device=s.device)  # pair p = (token p // E, expert p % E)
        if not self.training:
            # Static shapes, no host sync: unselected candidates get expert id E, so experts() sorts them
            # last and leaves them out of the offsets (their rows are zeroed, their weight unused).
            expert = torch.where(s.flatten() > self.threshold, pair % E, E)
            return pair // E, expert, s.flatten(), {"router_loss": s.new_zeros(())}
        weight, pair = s.flatten().topk(N * T * K)  # (A,)
        return pair // E, pair % E, weight, {"router_loss": self.similarity_loss(s.flatten(0, 1))}

    def similarity_loss(self, s):
        """Router similarity loss (Race-DiT; our reading, the exact formula is not in the material we
        have): s (NT, E) logits, each expert's column standardised over the tokens; C = Z^T Z / NT is
        the E x E correlation matrix; loss = beta * mean of C_ij^2 over i != j. Experts with correlated
        affinities race for the same tokens: 2-in-4 collapses into 1-in-2 (Fig. 4). The loss is at
        most beta (collinear experts), ~beta / NT for independent ones; beta's default is the official
        DiT-MoE balance weight, a regulariser well below the diffusion loss."""
        E = s.shape[1]
        z = (s - s.mean(dim=0)) / (s.std(dim=0, correction=0) + 1e-6)  # (NT, E)
        c = z.T @ z / s.shape[0]  # (E, E), diagonal 1
        return self.similarity_beta * (c.square().sum() - c.diagonal().square().sum()) / (E * (E - 1))

    def grouped_experts(self, x, token, expert, weight):
        """Sum over assignments (t, e, w) with e < E of w * expert_e(x[t]): the assignments sorted by
        expert and two grouped GEMMs over the sorted rows. x (NT, D), the rest (A,) -> (NT, D)."""
        expert, order = expert.sort(stable=True)  # group assignments by expert
        token = token.index_select(0, order)
        weight = weight.index_select(0, order)
        # offs[e] = number of assignments to experts <= e: the group ends grouped_mm wants. The
        # last one is A unless race inference left candidates (id E): rows past it come out zero.
        expert_ids = torch.arange(self.num_experts, device=x.device)
        offs = torch.searchsorted(expert, expert_ids, right=True, out_int32=True)  # (E,)
        ragged = self.router_kind == "race" and not self.training
        h = grouped_mm(x.index_select(0, token), self.w_gate_up, offs, ragged)  # (A, 2H)
        gate, up = h.chunk(2, dim=-1)  # each (A, H)
        h = grouped_mm(F.silu(gate) * up, self.w_down, offs, ragged)  # (A, D)
        h = h * weight[:, None].to(h.dtype)  # routing weights are float32
        return h.new_zeros(x.shape).index_add_(0, token, h)

    def padded_experts(self, x, token, expert, weight):
        """The same sum with static shapes: each expert's rows padded to their worst case. A token
        uses an expert at most once, so that is all NT tokens: every expert runs on every token and
        an unchosen pair gets weight 0 (0 * a finite value: exact). Costs E/K times the routed
        FLOPs of the grouped path, as two dense matmuls."""
        (NT, D), E = x.shape, self.num_experts
        H = self.w_down.shape[1]
        combine = weight.new_zeros(NT, E + 1).index_put_((token, expert), weight)  # (NT, E + 1)
        combine = combine[:, :E]  # column E held the unselected race candidates
        w_gate_up = self.w_gate_up.transpose(0, 1).reshape(D, E * 2 * H)  # (D, E*2H), expert-major
        gate, up = (x @ w_gate_up).view(NT, E, 2 * H).chunk(2, dim=-1)  # each (NT, E, H)
        h = F.silu(gate) * up * combine[..., None].to(gate.dtype)  # (NT, E, H)
        return h.reshape(NT, E * H) @ self.w_down.reshape(E * H, D)  # (NT, D), summed over experts

    def batched_experts(self, x, token, weight):
        """Expert choice: each expert has exactly N * capacity rows (route_expert lists them expert by
        expert), so the experts run as two batched matmuls with no sort and no padding."""
        E, D = self.num_experts, x.shape[1]
        h = torch.bmm(x.index_select(0, token).view(E, -1, D), self.w_gate_up)  # (E, N*C, 2H)
        gate, up = h.chunk(2, dim=-1)  # each (E, N*C, H)
        h = torch.bmm(F.silu(gate) * up, self.w_down).view(-1, D)  # (A, D)
        h = h * weight[:, None].to(h.dtype)
        return h.new_zeros(x.shape).index_add_(0, token, h)

    def dispatch_for(self, x):
        """The dispatch of token choice and race for input x: self.dispatch unless "auto"; then
        grouped where the grouped GEMM needs no host sync, padded elsewhere."""
        if self.dispatch != "auto":
            return self.dispatch
        # Under autocast the op runs in bfloat16 (registered above).
        autocast = torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)
        dtype = torch.bfloat16 if autocast else x.dtype
        return "grouped" if grouped_mm_is_fast(x.device, dtype) else "padded"

    def forward(self, x):
        N, T, D = x.shape
        token, expert, weight, aux = self.route(x)  # each (A,)
        # (Under gradient checkpointing the recompute repeats this update: the EMA then moves twice
        # per step, a memory of ~50 batches instead of ~100.)
        if self.router_kind == "race" and self.training:
            with torch.no_grad():  # the race threshold: EMA of the K-th largest logit, the last to get in
                last = weight.min().float()
                self.threshold.copy_(torch.where(self.threshold.isnan(), last,
                                                 torch.lerp(self.threshold, last, 1 - RACE_MOMENTUM)))
        x = x.reshape(N * T, D)
        if self.router_kind == "expert":
            y = self.batched_experts(x, token, weight)
        elif self.dispatch_for(x) == "grouped":
            y = self.grouped_experts(x, token, expert, weight)
        else:
            y = self.padded_experts(x, token, expert, weight)
        if self.shared is not None:
            y = y + self.shared(x)  # Eq. 3 plus the shared expert
        # assignments per expert; race inference's unselected candidates (id E) fall off the end
        counts = torch.zeros(self.num_experts + 1, device=x.device).index_add_(
            0, expert, torch.ones(expert.shape, device=x.device))[:-1]
        aux["counts"] = counts
        return y.reshape(N, T, D), aux

# ----------------------------------------------------------------------------
# Balance measures (Race-DiT Sec. on load balance, Table 2)
# ----------------------------------------------------------------------------

def max_violation(counts):
    """MaxVio: max_e load_e / mean_e load_e - 1 over the last dim, counts (..., E) -> (...). The usual
    definition (Wang et al. 2024, loss-free balancing); the material we have does not spell it out."""
    counts = counts.float()
    return counts.amax(dim=-1) / counts.mean(dim=-1) - 1


def assignment_mask(token, expert, num_tokens, num_experts):
    """(NT, E) bool, which experts each token used, from a router's (token, expert) lists."""
    mask = torch.zeros(num_tokens, num_experts + 1, dtype=torch.bool, device=token.device)
    return mask.index_put_((token, expert), torch.ones_like(token, dtype=torch.bool))[:, :num_experts]


def combination_usage(mask):
    """Combination usage as Race-DiT Fig. 13 computes it: mask (NT, E) bool. Count the tokens that
    use each expert pair i < j together, sort the counts descending, normalise; the share of the
    E(E-1)/2 pairs whose cumulative sum stays below 95%. Near 0.95 when all pairs are used evenly."""
    m = mask.float()
    i, j = torch.triu_indices(m.shape[1], m.shape[1], offset=1, device=m.device)
    pairs = (m.T @ m)[i, j].sort(descending=True).values  # co-activation counts, largest first
    return ((pairs / pairs.sum()).cumsum(0) < 0.95).float().mean()
