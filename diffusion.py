"""
The two training objectives of DiT-MoE and their samplers.

DDPM (the S and B checkpoints, as DiT): Ho et al. 2020 with epsilon prediction,
the learned-range variance and hybrid loss of Nichol & Dhariwal 2021 (IDDPM),
timestep respacing, ancestral and DDIM sampling. Rectified flow (the XL and G
checkpoints): the straight path and velocity target of the official DiT-MoE
code (feizhengcong/DiT-MoE) with an Euler sampler. Only the paths we use are here.

    from diffusion import create_objective
    obj = create_objective("ddpm")                                   # or "rf"
    t, x_t, noise = obj.training_inputs(x0)                          # t is what the model embeds
    terms = obj.training_losses(model(x_t, t, y), x0, x_t, t, noise) # terms["loss"]: (N,)
    x = obj.sample(model_fn, torch.randn(N, 4, 32, 32), sampler="ddpm", num_steps=250,
                   progress=True)

Tests: python -m pytest -q tests/test_diffusion.py
"""
import math
from types import SimpleNamespace

import torch
from tqdm import tqdm


# ----------------------------------------------------------------------------
# Gaussian helpers
# ----------------------------------------------------------------------------

def mean_flat(x):
    """Mean over every dimension but the batch: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) for data in [-1, 1] quantised to 256 levels, under N(mean, exp(2 log_scale)).

    Ho et al. 2020 Eq. 13: a bin of width 2/255 around each level, the two edge bins open
    to -inf / +inf, probabilities clamped at 1e-12 as IDDPM does. IDDPM uses a tanh
    approximation of the normal CDF; we use the exact one, in log space (log_ndtr) so that it
    keeps its precision in both tails (float64 ndtr is 2e-6 off at z = -7, and a bin above the
    mean as Phi(u) - Phi(l) cancels).
    """
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 1 / 255)
    lower = inv_std * (x - mean - 1 / 255)
    log_left_edge = torch.special.log_ndtr(upper)     # log Phi(u): the bin (-inf, -1 + 1/255]
    log_right_edge = torch.special.log_ndtr(-lower)   # log (1 - Phi(l)) = log Phi(-l)
    # log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - Phi(a) / Phi(b)), with a bin above the mean
    # mirrored below it (a = -u, b = -l) so that both CDFs are small and nothing cancels
    above = lower > 0
    a = torch.where(above, -upper, lower)
    b = torch.where(above, -lower, upper)
    log_cdf_b = torch.special.log_ndtr(b)
    log_bin = log_cdf_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_cdf_b))
    log_prob = torch.where(x < -0.999, log_left_edge,
                           torch.where(x > 0.999, log_right_edge, log_bin))
    return log_prob.clamp(min=math.log(1e-12))


def _gather(table, i, x):
    """table[i] of a float64 schedule table on x's device, in x's dtype, shaped (N, 1, ..., 1) to
    broadcast against x. index_select rather than table[i]: the same gather, and it also runs on
    fake CUDA tensors in a CPU build of torch, whose Python indexing refuses them (tests)."""
    return table.index_select(0, i).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def _check_sampler(sampler, valid, objective):
    """The sampler to run: None gives the objective's default (the first valid one), an unknown
    name a ValueError."""
    if sampler is None:
        return valid[0]
    if sampler not in valid:
        raise ValueError(f"unknown sampler {sampler!r} for the {objective} objective; "
                         f"valid: {', '.join(valid)}")
    return sampler


# ----------------------------------------------------------------------------
# DDPM
# ----------------------------------------------------------------------------

def space_timesteps(num_timesteps, count):
    """The `count` timesteps of 0 .. num_timesteps-1 that DiT / IDDPM keep when respacing.

    Their space_timesteps(T, [count]) walks a float position from 0 in strides of
    (T - 1) / (count - 1) and keeps Python's round() of each, half to even. The position is
    accumulated, not k * stride, because its float rounding decides the near-ties: at 21 steps
    the 11th position sums to just under 499.5 and keeps 499, where linspace(0, 999, 21) puts
    exactly 499.5 and rounds to 500. count = 1 keeps [0].
    """
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"respacing must be between 1 and {num_timesteps} steps, got {count}")
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1.0
    kept = []
    position = 0.0
    for _ in range(count):
        kept.append(round(position))
        position += stride
    return kept


class GaussianDiffusion:
    """DDPM with epsilon prediction and learned-range variance, T = 1000 linear betas by default.

    Internally steps are indexed i = 0 .. num_timesteps-1 over the kept timesteps; the model
    always sees the ORIGINAL timestep timestep_map[i] in 0 .. T-1, so a network trained on
    1000 steps samples with 250 of them.
    """
    samplers = ("ddpm", "ddim")
    default_steps = 250  # sampling steps: DiT's FID setting
    # the per-step tables, float64 on the CPU; lookups use their copy on the data's device
    TABLES = ("betas", "log_betas", "alphas_cumprod", "alphas_cumprod_prev",
              "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
              "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
              "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2",
              "posterior_log_variance_clipped", "timestep_map")

    def __init__(self, num_timesteps=1000, respacing=None):
        self.base_num_timesteps = num_timesteps
        # Ho et al. 2020 linear schedule, scaled as IDDPM does so that any T gives a similar process
        scale = 1000 / num_timesteps
        betas = torch.linspace(scale * 1e-4, scale * 2e-2, num_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.timestep_map = torch.arange(num_timesteps)
        if respacing == 1:
            # DiT keeps only t = 0 here and then fails in p_mean_variance with an IndexError: a
            # one-step schedule has no t = 1 to clip the posterior log variance to
            raise ValueError("respacing=1 keeps only timestep 0 (as DiT's space_timesteps does), "
                             "from which no sampler can run (DiT fails there too); "
                             "use 2 or more steps")
        if respacing is not None:
            # evenly strided steps from 0 to T-1, exactly DiT's (e.g. "250"); new betas keep
            # the kept alpha-bars: 1 - beta'_k = abar[t_k] / abar[t_{k-1}]
            # (Nichol & Dhariwal 2021 Sec. 4)
            self.timestep_map = torch.tensor(space_timesteps(num_timesteps, respacing))
            alphas_cumprod = alphas_cumprod[self.timestep_map]
            betas = 1 - alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64),
                                                    alphas_cumprod[:-1]])
        self.num_timesteps = len(betas)

        abar = alphas_cumprod
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.betas = betas
        self.log_betas = torch.log(betas)
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = abar_prev
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - abar).sqrt()
        self.sqrt_recip_alphas_cumprod = (1 / abar).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / abar - 1).sqrt()
        # posterior q(x_{t-1} | x_t, x_0), Ho et al. 2020 Eq. 6-7
        self.posterior_variance = betas * (1 - abar_prev) / (1 - abar)
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1 - abar)
        self.posterior_mean_coef2 = (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)
        # the posterior variance is 0 at t = 0: clip its log to the t = 1 value, as IDDPM does
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self._device_tables = {}  # device -> the TABLES there, see tables()
        self._respaced = {}       # sampling steps -> this schedule respaced, see sample()

    def tables(self, device):
        """The TABLES on `device` (the data's), moved there on first use and kept.

        Moving them per lookup would be 12 host-to-device copies per training step and 8 per
        sampling step, each a full stream sync from pageable memory on CUDA. They stay float64:
        lookups only gather N values and cast them to the data's dtype.
        """
        tables = self._device_tables.get(device)
        if tables is None:
            moved = {name: getattr(self, name).to(device) for name in self.TABLES}
            tables = SimpleNamespace(**moved)
            self._device_tables[device] = tables
        return tables

    def q_sample(self, x0, i, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: DiT-MoE Eq. 1, Ho et al. 2020 Eq. 4."""
        tab = self.tables(x0.device)
        a = _gather(tab.sqrt_alphas_cumprod, i, x0)  # (N, 1, 1, 1)
        b = _gather(tab.sqrt_one_minus_alphas_cumprod, i, x0)
        return a * x0 + b * noise

    def q_posterior(self, x0, x_t, i):
        """Mean and clipped log variance of q(x_{t-1} | x_t, x_0), Ho et al. 2020 Eq. 7."""
        tab = self.tables(x_t.device)
        coef1 = _gather(tab.posterior_mean_coef1, i, x_t)
        coef2 = _gather(tab.posterior_mean_coef2, i, x_t)
        return coef1 * x0 + coef2 * x_t, _gather(tab.posterior_log_variance_clipped, i, x_t)

    def pred_x0(self, x_t, i, eps):
        """x_0 implied by an epsilon prediction: Ho et al. 2020 Eq. 4 solved for x_0."""
        tab = self.tables(x_t.device)
        return (_gather(tab.sqrt_recip_alphas_cumprod, i, x_t) * x_t
                - _gather(tab.sqrt_recipm1_alphas_cumprod, i, x_t) * eps)

    def p_mean_variance(self, out, x_t, i):
        """Mean, log variance and x_0 estimate of p(x_{t-1} | x_t), from the model output
        out (N, 2C or C, ...)."""
        tab = self.tables(x_t.device)
        C = x_t.shape[1]
        # narrow(1, 0, C) is out[:, :C]; see _gather for why not the indexing
        pred_x0 = self.pred_x0(x_t, i, out.narrow(1, 0, C))
        mean, _ = self.q_posterior(pred_x0, x_t, i)  # Ho et al. 2020 Eq. 11 in x_0 form
        if out.shape[1] == 2 * C:
            # learned range, Nichol & Dhariwal 2021 Eq. 15: v in [-1, 1] interpolates the log
            # variance between the posterior variance (v = -1) and beta_t (v = +1)
            frac = (out.narrow(1, C, C) + 1) / 2
            min_log = _gather(tab.posterior_log_variance_clipped, i, x_t)
            log_var = frac * _gather(tab.log_betas, i, x_t) + (1 - frac) * min_log
        else:
            # no variance channels: fixed sigma_t^2 = beta_t
            # (Ho et al. 2020 Sec. 3.2, DiT's default)
            log_var = _gather(tab.log_betas, i, x_t)
        return mean, log_var, pred_x0

    def training_inputs(self, x0):
        """Uniform t and the noised x_t for a batch x0 (N, C, H, W) -> t (N,) long, x_t, noise,
        from the global RNG (train.py seeds it per micro-batch)."""
        i = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype)
        t = self.tables(x0.device).timestep_map.index_select(0, i)  # what the model embeds
        return t, self.q_sample(x0, i, noise), noise

    def target(self, x0, noise):
        """What the first C output channels predict: the noise epsilon (Ho et al. 2020 Eq. 14)."""
        return noise

    def training_losses(self, out, x0, x_t, t, noise):
        """Hybrid loss of Nichol & Dhariwal 2021 Eq. 16, per sample: a dict of (N,) tensors,
        "loss" = "mse" + "vb".

        t: the timesteps the model saw (original indices, as training_inputs returns them).
        """
        i = torch.searchsorted(self.tables(t.device).timestep_map, t)  # back to the internal index
        C = x0.shape[1]
        eps = out.narrow(1, 0, C)  # (N, C, H, W)
        # L_simple, Ho et al. Eq. 14
        terms = {"mse": mean_flat((self.target(x0, noise) - eps) ** 2)}
        if out.shape[1] == 2 * C:
            # L_vlb trains only the variance: with eps detached, the mean is learned by L_simple
            # alone (IDDPM Sec. 3.1, "stop-gradient" on the mean)
            frozen = torch.cat([eps.detach(), out.narrow(1, C, C)], dim=1)
            mean, log_var, _ = self.p_mean_variance(frozen, x_t, i)
            true_mean, true_log_var = self.q_posterior(x0, x_t, i)
            kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
            # at t = 0 the term is the decoder NLL -log p(x_0 | x_1) (Ho et al. 2020 Eq. 13);
            # in bits per dim
            nll = (-mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var))
                   / math.log(2.0))
            # one uniform step estimates L_vlb / T; times T / 1000 it is L_vlb / 1000 for any T, the
            # lambda = 0.001 weight of Eq. 16 (a no-op at DiT's T = 1000, which it trains with)
            terms["vb"] = torch.where(i == 0, nll, kl) * (self.num_timesteps / 1000)
        else:
            # fixed variance: nothing for L_vlb to train
            terms["vb"] = torch.zeros_like(terms["mse"])
        terms["loss"] = terms["mse"] + terms["vb"]
        return terms

    def _reverse_steps(self, x, progress):
        """The reverse steps, last to 0, as (i, i_n, t_n): the index, the index as (N,), and
        the model's timesteps (N,)."""
        timestep_map = self.tables(x.device).timestep_map
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress):
            i_n = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)  # a fill, no copy
            yield i, i_n, timestep_map.index_select(0, i_n)

    @torch.no_grad()
    def p_sample_loop(self, model_fn, noise, randn=torch.randn_like, progress=False):
        """Ancestral sampling, Ho et al. 2020 Algorithm 2, from x_T = noise to x_0."""
        x = noise
        for i, i_n, t_n in self._reverse_steps(x, progress):
            mean, log_var, _ = self.p_mean_variance(model_fn(x, t_n), x, i_n)
            # the last step returns the mean: no noise is added to x_0
            x = mean + torch.exp(0.5 * log_var) * randn(x) if i > 0 else mean
        return x

    @torch.no_grad()
    def ddim_sample_loop(self, model_fn, noise, eta=0.0, randn=torch.randn_like, progress=False):
        """DDIM, Song et al. 2021 Eq. 12; eta = 0 is deterministic, eta = 1 is ancestral DDPM."""
        x = noise
        tab = self.tables(x.device)
        for i, i_n, t_n in self._reverse_steps(x, progress):
            eps = model_fn(x, t_n).narrow(1, 0, x.shape[1])
            pred_x0 = self.pred_x0(x, i_n, eps)
            abar = _gather(tab.alphas_cumprod, i_n, x)
            abar_prev = _gather(tab.alphas_cumprod_prev, i_n, x)
            # Song et al. 2021 Eq. 16; eta = 1 makes sigma^2 the posterior variance of
            # Ho et al. Eq. 7
            sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
            x = abar_prev.sqrt() * pred_x0 + (1 - abar_prev - sigma ** 2).sqrt() * eps
            if i > 0 and eta > 0:
                x = x + sigma * randn(x)
        return x

    def schedule(self, num_steps):
        """This schedule respaced to num_steps (ValueError for a count no sampler can run), kept,
        so that its tables move to the device once, not once per batch."""
        if num_steps == self.num_timesteps:
            return self
        if num_steps not in self._respaced:
            self._respaced[num_steps] = GaussianDiffusion(self.base_num_timesteps,
                                                          respacing=num_steps)
        return self._respaced[num_steps]

    def sample(self, model_fn, noise, sampler=None, num_steps=None, eta=0.0, randn=torch.randn_like,
               progress=False):
        """Sample x_0 from x_T = noise with "ddpm" (default) or "ddim" (eta for DDIM only), over
        num_steps respaced steps (default: default_steps)."""
        sampler = _check_sampler(sampler, self.samplers, "ddpm")
        diffusion = self.schedule(num_steps or self.default_steps)
        if sampler == "ddpm":
            return diffusion.p_sample_loop(model_fn, noise, randn, progress)
        return diffusion.ddim_sample_loop(model_fn, noise, eta, randn, progress)


# ----------------------------------------------------------------------------
# Rectified flow
# ----------------------------------------------------------------------------

class RectifiedFlow:
    """Rectified flow as the official DiT-MoE code trains XL and G.

    z_t = (1 - t) x + t eps runs in a straight line from data (t = 0) to noise (t = 1); the
    model predicts its velocity dz/dt = eps - x and embeds the raw t in [0, 1].
    """
    samplers = ("euler",)
    default_steps = 50  # sampling steps: the official demo

    def q_sample(self, x0, t, noise):
        """z_t = (1 - t) x_0 + t eps for t (N,) in [0, 1]."""
        t = t.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return (1 - t) * x0 + t * noise

    def training_inputs(self, x0):
        """t (N,) float, z_t and the noise for a batch x0 (N, C, H, W), from the global RNG."""
        # logit-normal t = sigmoid(n), n ~ N(0, 1): dense mid-path (Esser et al. 2024 Sec. 3.1)
        t = torch.sigmoid(torch.randn(x0.shape[0], device=x0.device, dtype=x0.dtype))
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype)
        return t, self.q_sample(x0, t, noise), noise

    def target(self, x0, noise):
        """What the first C output channels predict: the velocity v = dz_t/dt = eps - x_0."""
        return noise - x0

    def training_losses(self, out, x0, x_t, t, noise):
        """Per-sample velocity MSE, a dict of (N,) tensors "loss" = "rf". Only the first C
        channels of out are used."""
        rf = mean_flat((self.target(x0, noise) - out.narrow(1, 0, x0.shape[1])) ** 2)
        return {"loss": rf, "rf": rf}

    @torch.no_grad()
    def euler_sample_loop(self, model_fn, noise, num_steps, progress=False):
        """Euler integration of dz/dt = v from t = 1 (noise) down to t = 0 in num_steps equal
        steps."""
        z = noise
        dt = 1.0 / num_steps
        for k in tqdm(range(num_steps, 0, -1), disable=not progress):
            # a fill, no copy
            t = torch.full((z.shape[0],), k / num_steps, device=z.device, dtype=z.dtype)
            z = z - dt * model_fn(z, t).narrow(1, 0, z.shape[1])
        return z

    def sample(self, model_fn, noise, sampler=None, num_steps=None, eta=0.0, randn=torch.randn_like,
               progress=False):
        """Euler sampling, with GaussianDiffusion.sample's signature. Euler is deterministic,
        so eta and randn are unused."""
        _check_sampler(sampler, self.samplers, "rf")
        return self.euler_sample_loop(model_fn, noise, num_steps or self.default_steps, progress)


# ----------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------

OBJECTIVES = ("ddpm", "rf")


def create_objective(name):
    """ddpm: GaussianDiffusion (T = 1000, as trained; sampling respaces it); rf: RectifiedFlow."""
    if name == "ddpm":
        return GaussianDiffusion()
    if name == "rf":
        return RectifiedFlow()
    raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
