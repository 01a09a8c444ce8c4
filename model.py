"""
DiT-MoE: a diffusion transformer whose MLPs are sparse mixtures of experts.

Fei et al. 2024, "Scaling Diffusion Transformers to 16 Billion Parameters".
The backbone is DiT (Peebles & Xie 2023): patchify, adaLN-Zero transformer
blocks conditioned on timestep + class, and a learned-sigma output head. Each
block's MLP is the MoE layer of moe.py (routed SwiGLU experts + a shared one).

    python model.py            # table of every registered size: params, active params, GFLOPs
    from model import create_model
    net = create_model("S/2-8E2A")          # 256x256 ImageNet latents (32x32x4), 1000 classes
(checkpoint.py reads our checkpoints, the official DiT-MoE ones and DiT's into this network.)
"""
import dataclasses
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from diffusion import OBJECTIVES
from moe import ROUTERS, MoE


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------

@dataclass
class DiTConfig:
    depth: int = 12
    hidden_size: int = 384           # D
    num_heads: int = 6
    patch_size: int = 2
    num_experts: int = 8             # E routed experts per block; 0 = dense DiT (GELU MLP)
    mlp_ratio: float = 4.0           # dense MLP width / D (DiT: 4;
                                     # 15 matches T/2-4E2A's active FLOPs)
    top_k: int = 2                   # K experts per token
    shared_hidden: int | None = None # width of the shared SwiGLU expert:
                                     # None = 2D (paper n_s = 2), 0 = none
    router: str = "token"            # "token" (DiT-MoE), "expert" (EC-DiT)
                                     # or "race" (Race-DiT): moe.py
    balance_alpha: float = 0.05      # Eq. 5 alpha (paper value; the official code used 0.01)
    capacity_factor: float = 1.0     # expert choice: each expert takes
                                     # ceil(f T K / E) tokens per image
    similarity_beta: float = 0.01    # race: weight of the router similarity loss (moe.py)
    layer_reg: float = 0.0           # > 0: Race-DiT's per-layer regularisation
                                     # (router MLP + target head), its weight
    input_size: int = 32             # latent height = width (256px images / VAE factor 8)
    in_channels: int = 4             # C
    num_classes: int = 1000
    qk_norm: bool = False            # LayerNorm on q and k per head (official XL and G checkpoints)
    learn_sigma: bool = True         # output 2C channels: prediction + variance interpolation
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance
    objective: str = "ddpm"          # what the output means: "ddpm" (epsilon) or "rf" (velocity)
    latent_space: bool = True        # inputs are SD-VAE latents (x 0.18215);
                                     # False: pixels in [-1, 1]

    @property
    def out_channels(self):
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self):
        return (self.input_size // self.patch_size) ** 2

    def check(self):
        """The first field value that cannot build a network, as one line; None when all can."""
        D = self.hidden_size
        E = self.num_experts
        rules = [
            (self.depth >= 1, "depth must be >= 1"),
            (self.num_heads >= 1 and D % self.num_heads == 0,
             "hidden_size must split into num_heads heads"),
            (D >= 4 and D % 4 == 0,
             "hidden_size must be a multiple of 4 (the 2-D sin-cos position table)"),
            (E >= 0, "num_experts must be >= 0 (0: dense DiT)"),
            (not E or D % 8 == 0,
             "hidden_size of an MoE must be a multiple of 8 (grouped GEMM alignment)"),
            (not E or 1 <= self.top_k <= E, "top_k must be between 1 and num_experts"),
            (self.shared_hidden is None or self.shared_hidden >= 0,
             "shared_hidden must be >= 0 (0: none)"),
            (E or self.mlp_ratio > 0, "mlp_ratio must be > 0"),
            (self.router in ROUTERS, f"router must be one of {', '.join(ROUTERS)}"),
            (self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}"),
            (self.capacity_factor > 0, "capacity_factor must be > 0"),
            (E or not self.layer_reg,
             "layer_reg (Race-DiT's per-layer regularisation) needs an MoE router"),
            (min(self.balance_alpha, self.similarity_beta, self.layer_reg) >= 0,
             "balance_alpha, similarity_beta and layer_reg must be >= 0"),
            (0 <= self.class_dropout_prob < 1, "class_dropout_prob must be in [0, 1)"),
            (self.patch_size >= 1 and self.input_size % self.patch_size == 0
             and self.input_size >= 1,
             "input_size must be a positive multiple of patch_size"),
            (self.in_channels >= 1 and self.num_classes >= 1,
             "in_channels and num_classes must be >= 1"),
        ]
        return next((f"model config: {msg} (got {self.short()})" for ok, msg in rules if not ok),
                    None)

    def short(self):
        """The fields that differ from the defaults, as `name=value` pairs."""
        default = DiTConfig()
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                         if getattr(self, f.name) != getattr(default, f.name)) or "defaults"


# ----------------------------------------------------------------------------
# Embedders and attention
# ----------------------------------------------------------------------------

def modulate(x, shift, scale):
    # adaLN: per-sample affine transform of normalised tokens, x (N, T, D), shift/scale (N, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim, pos):
    # Transformer sin-cos code of positions pos (M,) -> (M, dim): [sin(pos w), cos(pos w)]
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim, grid):
    # Fixed 2-D position table (grid*grid, dim): first half codes the column, second the row.
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()),
                      sincos_1d(dim // 2, rows.flatten())], 1).float()


def timestep_embedding(t, dim=256, max_period=10000):
    # Sinusoidal code of scalar timesteps (N,) -> (N, dim) = [cos(t f), sin(t f)];
    # t may be fractional.
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t[:, None].float() * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimestepEmbedder(nn.Module):
    """The sinusoidal code of t (freq_dim = 256 wide: 128 frequencies, cos and sin), then an MLP."""
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        # t itself never goes below float32 (rectified flow's t in [0, 1] would lose digits in
        # bf16): its sin-cos code is computed in float32, then takes the MLP's dtype
        freq = timestep_embedding(t, self.freq_dim)         # (N, 256)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class table with one extra row (index num_classes) for the null class of CFG."""
    def __init__(self, num_classes, dim, dropout_prob):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), dim)

    def forward(self, y):
        if self.training and self.dropout_prob > 0:  # label dropout teaches the unconditional model
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)  # (N, D)


class Attention(nn.Module):
    """Multi-head self-attention; with qk_norm, the official XL/G variant (LayerNorm on q and k)."""
    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // num_heads
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).view(N, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                          # each (N, heads, T, D/heads)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))         # (N, T, D)


class Mlp(nn.Module):
    """DiT's dense MLP (Eq. 4): fc2(gelu(fc1(x))), width 4D in DiT. Used by the dense sizes."""
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# ----------------------------------------------------------------------------
# Transformer blocks
# ----------------------------------------------------------------------------

class DiTBlock(nn.Module):
    """adaLN-Zero block: attention and MoE (or MLP), each scaled by a gate that starts at zero."""
    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(D, cfg.num_heads, cfg.qk_norm)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        if cfg.num_experts:
            # PLR's head predicts the target's patch, p*p*C values; 0: no head
            plr = cfg.patch_size ** 2 * cfg.in_channels if cfg.layer_reg > 0 else 0
            self.moe = MoE(D, cfg.num_experts, cfg.top_k, shared_hidden=cfg.shared_hidden,
                           router=cfg.router, balance_alpha=cfg.balance_alpha,
                           capacity_factor=cfg.capacity_factor, similarity_beta=cfg.similarity_beta,
                           target_dim=plr)
        else:
            self.mlp = Mlp(D, int(cfg.mlp_ratio * D))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c):
        # x (N, T, D), c (N, D) -> x (N, T, D) and the MoE's aux (router_loss, load); dense: empty
        # adaLN-Zero's six modulations, each (N, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        h = modulate(self.norm2(x), shift2, scale2)  # (N, T, D)
        if not hasattr(self, "moe"):
            return x + gate2.unsqueeze(1) * self.mlp(h), {}
        h, aux = self.moe(h)
        return x + gate2.unsqueeze(1) * h, aux


class FinalLayer(nn.Module):
    """adaLN (shift and scale, no gate) and a linear map of each token to its p x p x 2C patch."""
    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(D, cfg.patch_size ** 2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*2C)


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------

class DiT(nn.Module):
    """Patchify + position table, t and y embedded into c, depth adaLN-Zero blocks,
    final layer, unpatchify."""
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        p = cfg.patch_size
        self.x_embedder = nn.Module()  # a shell, so the key stays DiT's x_embedder.proj.*
        self.x_embedder.proj = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        # Fixed, not trained: a buffer, so optimizers and EMA never see it
        # (still saved as "pos_embed").
        self.register_buffer("pos_embed", sincos_2d(D, cfg.input_size // p).unsqueeze(0))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.grad_checkpointing = False  # recompute block activations in backward (large sizes)
        self.initialize_weights()

    def initialize_weights(self):
        # DiT's init: xavier-uniform linears, N(0, 0.02) embeddings, zeroed adaLN and output layers.
        # The MoE layers initialised themselves as the official code does
        # (moe.MoE.reset_parameters).
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and ".moe." not in name:
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        # (N, T, p*p*C) -> (N, C, H, W) with T = (H/p) * (W/p); C is 2C for the model output
        N, T, _ = x.shape
        p = self.cfg.patch_size
        h = math.isqrt(T)
        C = x.shape[2] // p ** 2
        x = x.view(N, h, h, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (N, C, h, p, w, p)
        return x.reshape(N, C, h * p, h * p)

    def forward(self, x, t, y, return_aux=False):
        """x (N, C, H, W) noisy input, t (N,) timesteps, y (N,) labels (num_classes = null class).

        Returns (N, out_channels, H, W) (2C with learn_sigma); with return_aux also
        {"router_loss": summed router loss of all layers, "load": (L, E) assignments per expert
        per layer}, and "layer_preds": (L, N, C, H, W), each layer's prediction of the diffusion
        target (Race-DiT's PLR), when cfg.layer_reg > 0.
        """
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)                              # (N, D)
        router_loss = x.new_zeros((), dtype=torch.float32)
        load = []
        preds = []
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x, block_aux = checkpoint(block, x, c, use_reentrant=False)
            else:
                x, block_aux = block(x, c)                                      # (N, T, D)
            if block_aux:
                router_loss = router_loss + block_aux["router_loss"]
                load.append(block_aux["load"])                                  # (E,)
            if "layer_pred" in block_aux:
                preds.append(block_aux["layer_pred"])                           # (N, T, p*p*C)
        x = self.unpatchify(self.final_layer(x, c))                   # (N, out_channels, H, W)
        if not return_aux:
            return x
        aux = {"router_loss": router_loss,
               "load": torch.stack(load) if load else x.new_zeros(len(self.blocks), 0)}  # (L, E)
        if preds:
            aux["layer_preds"] = self.unpatchify(torch.cat(preds)).unflatten(0, (len(preds), -1))
        return x, aux

    def forward_with_cfg(self, x, t, y, cfg_scale, guided_channels=None):
        """Classifier-free guidance (Ho & Salimans 2022) in one batched call.

        x holds the same latents twice, y the labels then the null class. The guided prediction
        uncond + s * (cond - uncond) is returned for both halves. By default all C channels are
        guided; guided_channels=3 reproduces DiT / official DiT-MoE exactly (DiT issue #41).
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)             # (2N, out_channels, H, W)
        G = self.cfg.in_channels if guided_channels is None else guided_channels
        guide = out[:, :G]
        rest = out[:, G:]
        cond, uncond = guide.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


# ----------------------------------------------------------------------------
# Size registry: the exact CLI strings, 256x256 ImageNet latents by default
# ----------------------------------------------------------------------------

SIZES = {  # name: (depth, hidden D, heads, qk_norm as in the released checkpoints)
    "S": (12, 384, 6, False), "B": (12, 768, 12, False), "L": (24, 1024, 16, False),
    "XL": (28, 1152, 16, True), "G": (40, 1408, 16, True),
    "T": (4, 128, 4, False),  # tiny: the built-in CPU demo and the tests
}
NAMES = (["S/2-8E2A", "S/2-16E2A", "B/2-8E2A", "L/2-8E2A", "XL/2-8E2A", "G/2-16E2A", "T/2-4E2A"]
         + [f"{s}/{p}-8E2A" for s in ("S", "B", "L", "XL") for p in (4, 8)]
         + ["S/2", "B/2", "L/2", "XL/2", "T/2"])


def config_from_name(name, **overrides):
    m = re.fullmatch(r"(S|B|L|XL|G|T)/(\d+)(?:-(\d+)E(\d+)A)?", name)
    if name not in NAMES or m is None:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(NAMES)}")
    depth, D, heads, qk_norm = SIZES[m[1]]
    experts, k = (int(m[3]), int(m[4])) if m[3] else (0, 0)
    cfg = DiTConfig(depth=depth, hidden_size=D, num_heads=heads, patch_size=int(m[2]),
                    num_experts=experts, top_k=k, qk_norm=qk_norm)
    return dataclasses.replace(cfg, **overrides)


def create_model(name, **overrides):
    return DiT(config_from_name(name, **overrides))


def count(cfg):
    """(total params, active params per token, GFLOPs per image), read off the modules of a network
    built on the meta device (no memory). FLOPs as DiT counts them: one multiply-add is one FLOP,
    every matmul. (The paper's Table 1 used thop, which misses the experts' F.linear calls.)"""
    with torch.device("meta"):
        net = DiT(cfg)
    total = sum(p.numel() for p in net.parameters())
    T = cfg.num_tokens
    K = cfg.top_k
    E = cfg.num_experts
    experts = sum(m.w_gate_up.numel() + m.w_down.numel()
                  for m in net.modules() if isinstance(m, MoE))
    active = total - experts * (E - K) // max(E, 1)  # a token runs K of the E routed experts
    per_image = 0  # the conditioning: adaLN and t-embedder MLPs run once per image
    per_token = net.x_embedder.proj.weight.numel() + experts * K // max(E, 1)
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear) and ("adaLN" in name or "t_embedder" in name):
            per_image += m.weight.numel()
        elif isinstance(m, nn.Linear) and "target_head" not in name:  # PLR's head: training only
            per_token += m.weight.numel()
    per_token += cfg.depth * 2 * T * cfg.hidden_size  # attention: q k^T and att v
    return total, active, (T * per_token + per_image) / 1e9


if __name__ == "__main__":
    print(f"{'model':<11} {'params':>9} {'active':>9} {'GFLOPs':>8}   (256x256, 32x32x4 latents)")
    for name in NAMES:
        total, active, gflops = count(config_from_name(name))
        print(f"{name:<11} {total / 1e6:>8.1f}M {active / 1e6:>8.1f}M {gflops:>8.2f}")
