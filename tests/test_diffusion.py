"""
Tests of diffusion.py against independent computations: closed forms written in numpy,
Gaussian conditioning, numerical integration, scipy's normal CDF, sharp Monte Carlo, the
official respacing rule restated, and a count of host syncs on fake CUDA tensors.

    python -m pytest -q tests/test_diffusion.py
"""
import itertools
import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch._subclasses.fake_tensor import FakeTensorMode

from diffusion import (GaussianDiffusion, RectifiedFlow, create_objective,
                       discretized_gaussian_log_likelihood, normal_kl, space_timesteps)
from sync_count import CountSyncs

T = 1000
BETAS = np.linspace(1e-4, 2e-2, T)       # Ho et al. 2020 linear schedule, written out here
ABAR = np.cumprod(1 - BETAS)             # alpha-bar_t = prod_{s <= t} (1 - beta_s)


def dit_respacing(n):
    """DiT's space_timesteps(1000, str(n)) restated: the running sums 0, s, s + s, ... of the float
    stride s = 999 / (n - 1) (1 when n = 1), added left to right, each rounded half to even."""
    stride = (T - 1) / (n - 1) if n > 1 else 1.0
    positions = itertools.accumulate([stride] * (n - 1), initial=0.0)
    return [round(p) for p in positions]


def posterior_by_conditioning(abar_t, abar_prev, x0, x_t):
    """q(x_prev | x_t, x_0) from the joint Gaussian of (x_prev, x_t) given x_0.

    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) e1, x_t = r x_prev + sqrt(1 - r^2) e2
    with r^2 = abar_t / abar_prev, so Cov(x_prev, x_t) = r (1 - abar_prev), Var(x_t) = 1 - abar_t.
    """
    c11, c12, c22 = 1 - abar_prev, np.sqrt(abar_t / abar_prev) * (1 - abar_prev), 1 - abar_t
    mean = np.sqrt(abar_prev) * x0 + c12 / c22 * (x_t - np.sqrt(abar_t) * x0)
    return mean, c11 - c12 ** 2 / c22


def model_var_by_hand(abars, k, v):
    """Learned-range variance at step k of a schedule with alpha-bars abars: exp of the
    (v+1)/2 mix of log beta_k and log of the posterior variance (taken at k = 1 when k = 0)."""
    prev = np.concatenate([[1.0], abars[:-1]])
    beta = 1 - abars[k] / prev[k]
    kk = max(k, 1)
    _, post_var = posterior_by_conditioning(abars[kk], prev[kk], 0.0, 0.0)
    frac = (v + 1) / 2
    return np.exp(frac * np.log(beta) + (1 - frac) * np.log(post_var))


def generator(seed):
    return torch.Generator().manual_seed(seed)


def seeded_randn(g):
    """The samplers' randn(like) drawing from generator g."""
    return lambda like: torch.randn(like.shape, generator=g, dtype=like.dtype)


# ----------------------------------------------------------------------------
# Forward process and posterior
# ----------------------------------------------------------------------------

def test_schedule_and_q_sample_moments():
    d = GaussianDiffusion()
    np.testing.assert_allclose(d.betas.numpy(), BETAS, rtol=1e-12)
    for t in [0, 1, 500, 999]:
        prod = math.prod(1 - b for b in BETAS[: t + 1])
        assert abs(d.sqrt_alphas_cumprod[t].item() - math.sqrt(prod)) < 1e-12
        assert abs(d.sqrt_one_minus_alphas_cumprod[t].item() - math.sqrt(1 - prod)) < 1e-12
    # Monte Carlo moments of q(x_t | x_0) = N(sqrt(abar) x0, (1 - abar) I)
    n, x0 = 200_000, torch.tensor([0.7, -1.3], dtype=torch.float64).view(1, 2, 1, 1).expand(200_000, 2, 1, 1)
    for t in [0, 300, 999]:
        noise = torch.randn(x0.shape, generator=generator(t), dtype=torch.float64)
        x_t = d.q_sample(x0, torch.full((n,), t), noise)[:, :, 0, 0].numpy()
        mean, var = np.sqrt(ABAR[t]) * np.array([0.7, -1.3]), 1 - ABAR[t]
        np.testing.assert_allclose(x_t.mean(0), mean, atol=5 * np.sqrt(var / n))
        np.testing.assert_allclose(x_t.var(0), var, rtol=5 * np.sqrt(2 / n))


def test_posterior_matches_gaussian_conditioning():
    d = GaussianDiffusion()
    rng = np.random.default_rng(0)
    t = np.array([1, 2, 10, 250, 998, 999])
    x0, x_t = rng.normal(size=(6, 3, 2, 2)), rng.normal(size=(6, 3, 2, 2))
    mean, log_var = d.q_posterior(torch.from_numpy(x0), torch.from_numpy(x_t), torch.from_numpy(t))
    abar_t, abar_prev = ABAR[t].reshape(-1, 1, 1, 1), ABAR[t - 1].reshape(-1, 1, 1, 1)
    ref_mean, ref_var = posterior_by_conditioning(abar_t, abar_prev, x0, x_t)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.exp(log_var.numpy()), np.broadcast_to(ref_var, log_var.shape), rtol=1e-9)
    # t = 0: a point mass at x_0 (coef1 = 1, coef2 = 0); the log variance is clipped to t = 1's
    zero = torch.zeros(6, dtype=torch.long)
    mean0, log_var0 = d.q_posterior(torch.from_numpy(x0), torch.from_numpy(x_t), zero)
    np.testing.assert_allclose(mean0.numpy(), x0, atol=1e-12)
    _, var1 = posterior_by_conditioning(ABAR[1], ABAR[0], 0.0, 0.0)
    np.testing.assert_allclose(np.exp(log_var0.numpy()), var1, rtol=1e-9)


# ----------------------------------------------------------------------------
# Gaussian helpers
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("m1,lv1,m2,lv2", [(0, 0, 0, 0), (0.3, -1.0, -0.5, 0.4), (2.0, 1.0, 0.0, -2.0)])
def test_normal_kl_against_quadrature(m1, lv1, m2, lv2):
    p = stats.norm(m1, math.exp(lv1 / 2))
    q = stats.norm(m2, math.exp(lv2 / 2))
    ref, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -30, 30, limit=200)
    kl = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, lv1, m2, lv2))).item()
    assert abs(kl - ref) < 1e-8


def test_discretized_log_likelihood_against_extended_precision():
    x = np.linspace(-1, 1, 256)                           # the 256 levels, both edges included
    rng = np.random.default_rng(1)
    log_scale = rng.uniform(-6, 0.5, size=256)
    # means from 7.2 standard deviations below x to 7.2 above: both tails down to the 1e-12 clamp,
    # where float64 CDFs lose digits; and eight far away, clamped
    z = rng.uniform(-7.2, 7.2, size=256)
    z[100:108] = 60
    mean = x - np.exp(log_scale) * z
    ref = []
    with mpmath.workdps(50):  # 50 digits: the reference has no cancellation or tail error
        for xk, mk, sk in zip(x, mean, log_scale):
            inv_std = mpmath.exp(-mpmath.mpf(sk))
            upper = mpmath.ncdf(inv_std * (mpmath.mpf(xk) - mpmath.mpf(mk) + mpmath.mpf(1) / 255))
            lower = mpmath.ncdf(inv_std * (mpmath.mpf(xk) - mpmath.mpf(mk) - mpmath.mpf(1) / 255))
            # edge bins open: (-inf, -1 + 1/255] and [1 - 1/255, inf)
            prob = upper if xk < -0.999 else 1 - lower if xk > 0.999 else upper - lower
            ref.append(float(mpmath.log(max(prob, mpmath.mpf(1e-12)))))
    inputs = [torch.from_numpy(a).requires_grad_() for a in (x, mean, log_scale)]
    out = discretized_gaussian_log_likelihood(*inputs)
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-9, atol=1e-12)
    assert sum(r > math.log(1e-12) for r in ref) > 200 and min(r for r in ref if r > -27.6) < -25
    # the branches torch.where leaves unused must not turn the gradient into NaN
    grads = torch.autograd.grad(out.sum(), inputs[1:])
    assert all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------
# Respacing and the learned-range variance
# ----------------------------------------------------------------------------

def test_respacing_keeps_alpha_bars():
    d = GaussianDiffusion(respacing=250)
    assert d.num_timesteps == 250
    assert d.timestep_map.tolist() == dit_respacing(250)
    kept = ABAR[d.timestep_map.numpy()]
    np.testing.assert_allclose(np.cumprod(1 - d.betas.numpy()), kept, rtol=1e-12)
    full, same = GaussianDiffusion(), GaussianDiffusion(respacing=1000)
    assert same.timestep_map.tolist() == list(range(T))
    np.testing.assert_allclose(same.betas.numpy(), full.betas.numpy(), rtol=1e-10)
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="respacing"):
            GaussianDiffusion(respacing=bad)


def test_respacing_is_the_official_rule_at_every_count():
    # every count 1..1000, the rule alone and as the schedule a GaussianDiffusion samples with
    linspace_differs = 0
    for n in range(1, T + 1):
        official = dit_respacing(n)
        assert space_timesteps(T, n) == official, n
        if n > 1:
            assert GaussianDiffusion(respacing=n).timestep_map.tolist() == official, n
            old_rule = torch.linspace(0, T - 1, n, dtype=torch.float64).round().long().tolist()
            linspace_differs += old_rule != official
    # the counts where the old rule, torch.linspace(0, 999, n).round(), kept other steps
    assert linspace_differs == 282


def test_respacing_hand_worked_counts():
    assert space_timesteps(T, 2) == [0, 999]
    assert space_timesteps(T, 4) == [0, 333, 666, 999]
    assert space_timesteps(T, T) == list(range(T))
    # 7 steps: stride 166.5 and its multiples are exact floats, so the ties are true ties, rounded
    # half to even (Python's round, as the official code): 166.5 -> 166, 499.5 -> 500, 832.5 -> 832
    assert space_timesteps(T, 7) == [0, 166, 333, 500, 666, 832, 999]
    # 21 steps: stride fl(999 / 20) = 49.95 + 2.8e-15; ten additions sum to 499.49999999999994, so
    # the official code keeps 499 where linspace (exactly 499.5, to even: 500) and 10 * stride
    # (rounded once to 499.5) would keep 500
    stride = 999 / 20
    assert sum([stride] * 10) == 499.49999999999994 and 10 * stride == 499.5
    kept = space_timesteps(T, 21)
    assert kept[9:12] == [450, 499, 549] and len(kept) == 21 and kept[-1] == 999
    assert torch.linspace(0, 999, 21, dtype=torch.float64)[10] == 499.5
    # 1 step: the official rule keeps t = 0 alone, where DiT's sampler fails (no t = 1 to clip
    # the posterior log variance to): the rule answers, the schedule refuses with the reason
    assert space_timesteps(T, 1) == [0]
    with pytest.raises(ValueError, match="keeps only timestep 0"):
        GaussianDiffusion(respacing=1)
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="between 1 and 1000"):
            space_timesteps(T, bad)


def test_learned_range_endpoints():
    d = GaussianDiffusion()
    t = torch.tensor([0, 1, 40, 999])
    x_t = torch.zeros(4, 1, 1, 1, dtype=torch.float64)
    for v in (-1.0, 0.0, 1.0):
        out = torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, v)], dim=1)
        _, log_var, _ = d.p_mean_variance(out, x_t, t)
        ref = [model_var_by_hand(ABAR, k, v) for k in t.tolist()]
        np.testing.assert_allclose(np.exp(log_var.flatten().numpy()), ref, rtol=1e-9)
    # v = +1 is beta_t itself (Nichol & Dhariwal 2021 Eq. 15 with v = 1)
    np.testing.assert_allclose(model_var_by_hand(ABAR, 40, 1.0), BETAS[40], rtol=1e-12)


# ----------------------------------------------------------------------------
# Hybrid loss
# ----------------------------------------------------------------------------

def test_perfect_model_losses_and_frozen_mean():
    d = GaussianDiffusion()
    x0 = torch.rand(6, 2, 4, 4, generator=generator(0), dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator(1), dtype=torch.float64)
    t = torch.tensor([1, 2, 100, 500, 999, 0])
    x_t = d.q_sample(x0, t, noise)
    # exact epsilon and the true posterior variance (v = -1): mse = 0 and, for t > 0, KL = 0
    out = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    terms = d.training_losses(out, x0, x_t, t, noise)
    assert terms["mse"].abs().max() < 1e-20
    assert terms["vb"][:5].abs().max() < 1e-10
    # at t = 0 vb is the decoder NLL of x_0 under N(x_0, posterior variance at t = 1), bits per dim
    scale = math.sqrt(model_var_by_hand(ABAR, 0, -1.0))
    x = x0[5].numpy()
    ll = np.log(stats.norm.cdf(x + 1 / 255, x, scale) - stats.norm.cdf(x - 1 / 255, x, scale))
    assert abs(terms["vb"][5].item() - (-ll.mean() / math.log(2))) < 1e-9
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    # the vb term reaches only the variance channels; mse only the epsilon channels
    out = torch.randn(6, 4, 4, 4, generator=generator(2), dtype=torch.float64, requires_grad=True)
    terms = d.training_losses(out, x0, x_t, t, noise)
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert g_vb[:, :2].abs().max() == 0 and g_vb[:, 2:].abs().min() > 0
    assert g_mse[:, 2:].abs().max() == 0 and g_mse[:, :2].abs().max() > 0


@pytest.mark.parametrize("respacing", [None, 250])
def test_vb_term_against_numpy(respacing):
    d = GaussianDiffusion(respacing=respacing)
    abars = ABAR[d.timestep_map.numpy()]
    prev = np.concatenate([[1.0], abars[:-1]])
    rng = np.random.default_rng(2)
    k = np.array([1, 7, 120, d.num_timesteps - 1])       # internal steps, t > 0
    x0, noise = rng.uniform(-1, 1, size=(4, 3, 2, 2)), rng.normal(size=(4, 3, 2, 2))
    eps, v = rng.normal(size=(4, 3, 2, 2)), rng.uniform(-1, 1, size=(4, 3, 2, 2))
    a = abars[k].reshape(-1, 1, 1, 1)
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    # model: x_0 estimate from eps, then the posterior mean given that estimate
    x0_hat = (x_t - np.sqrt(1 - a) * eps) / np.sqrt(a)
    true_mean, true_var = posterior_by_conditioning(a, prev[k].reshape(-1, 1, 1, 1), x0, x_t)
    model_mean, _ = posterior_by_conditioning(a, prev[k].reshape(-1, 1, 1, 1), x0_hat, x_t)
    model_var = np.stack([model_var_by_hand(abars, kk, vv) for kk, vv in zip(k, v)])
    kl = 0.5 * (np.log(model_var / true_var) + (true_var + (true_mean - model_mean) ** 2) / model_var - 1)
    ref = kl.reshape(4, -1).mean(1) / math.log(2) * d.num_timesteps / 1000
    t = d.timestep_map[torch.from_numpy(k)]            # the model's (original) timesteps
    out = torch.from_numpy(np.concatenate([eps, v], axis=1))
    terms = d.training_losses(out, *(torch.from_numpy(a) for a in (x0, x_t)), t, torch.from_numpy(noise))
    np.testing.assert_allclose(terms["vb"].numpy(), ref, rtol=1e-9)
    np.testing.assert_allclose(terms["mse"].numpy(), ((noise - eps) ** 2).reshape(4, -1).mean(1), rtol=1e-12)


def test_training_inputs():
    d = GaussianDiffusion(respacing=250)
    x0 = torch.randn(4096, 1, 2, 2, generator=generator(3))
    torch.manual_seed(4)
    t, x_t, noise = d.training_inputs(x0)
    assert t.dtype == torch.long and set(t.tolist()) <= set(dit_respacing(250))
    assert len(set(t.tolist())) > 200                   # uniform over the 250 kept steps
    a = torch.from_numpy(np.sqrt(ABAR[t.numpy()])).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a * x0 + (1 - a ** 2).sqrt() * noise, rtol=1e-5, atol=1e-5)


def tanh_normal_cdf(z):
    """The official code's normal CDF (IDDPM / DiT diffusion_utils, after Page 1977):
    Phi(z) ~ (1 + tanh(sqrt(2 / pi) (z + 0.044715 z^3))) / 2."""
    return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))


def decoder_nll_bits(x0, mean, log_var, cdf, sf):
    """-log p(x_0 | x_1) per sample, bits per dim: Ho et al. 2020 Eq. 13's bins of half-width
    1/255 under N(mean, exp(log_var)) with the given CDF and survival function, edge bins open,
    probabilities clamped at 1e-12 as the official code does."""
    inv_std = np.exp(-0.5 * log_var)
    upper = inv_std * (x0 - mean + 1 / 255)
    lower = inv_std * (x0 - mean - 1 / 255)
    # a bin above the mean as a difference of tails, where the CDFs would cancel
    bin_prob = np.where(lower > 0, sf(lower) - sf(upper), cdf(upper) - cdf(lower))
    prob = np.where(x0 < -0.999, cdf(upper), np.where(x0 > 0.999, sf(lower), bin_prob))
    return -np.log(np.maximum(prob, 1e-12)).reshape(len(x0), -1).mean(1) / math.log(2)


def test_t0_vb_against_the_official_tanh_cdf():
    # we keep the exact normal CDF for the decoder term at t = 0; this measures how far the
    # official tanh approximation moves vb there (the numbers of the README's table of differences)
    z = np.linspace(-8, 8, 160001)
    cdf_error = np.abs(tanh_normal_cdf(z) - stats.norm.cdf(z)).max()
    assert 1.78e-4 < cdf_error < 1.80e-4  # the approximation's known worst case, near |z| = 2.59
    d = GaussianDiffusion()
    rng = np.random.default_rng(20)
    x0 = rng.normal(size=(64, 4, 32, 32))  # latent-like: 256px SD-VAE latents, about unit scale
    noise = rng.normal(size=x0.shape)
    t = torch.zeros(len(x0), dtype=torch.long)
    x_t = d.q_sample(torch.from_numpy(x0), t, torch.from_numpy(noise))
    # model outputs: DiT's zero-initialised head (eps = 0, v = 0); eps = 0 is also near what a
    # trained model predicts at t = 0, where the noise is 1% of the signal; an eps guess
    # independent of the noise with the smallest variance (v = -1) is the far case
    cases = [(np.zeros_like(x0), np.zeros_like(x0), 0.0002, 0.0007),
             (np.zeros_like(x0), -np.ones_like(x0), 0.0012, 0.0025),
             (rng.normal(size=x0.shape), -np.ones_like(x0), 0.012, 0.018)]
    for eps, v, low, high in cases:
        out = torch.from_numpy(np.concatenate([eps, v], axis=1))
        vb = d.training_losses(out, torch.from_numpy(x0), x_t, t, torch.from_numpy(noise))["vb"].numpy()
        mean, log_var, _ = d.p_mean_variance(out, x_t, t)
        mean = mean.numpy()
        log_var = log_var.numpy()
        exact = decoder_nll_bits(x0, mean, log_var, stats.norm.cdf, stats.norm.sf)
        official = decoder_nll_bits(x0, mean, log_var, tanh_normal_cdf, lambda z: 1 - tanh_normal_cdf(z))
        np.testing.assert_allclose(vb, exact, rtol=1e-9)
        assert low < official.mean() / vb.mean() - 1 < high


# ----------------------------------------------------------------------------
# DDPM and DDIM sampling with oracle models
# ----------------------------------------------------------------------------

def delta_oracle(x_star, seen):
    """Exact epsilon for a dataset of one point x_star: eps = (x_t - sqrt(abar) x*) / sqrt(1 - abar)."""
    def model_fn(x, t):
        seen.append(t[0].item())
        a = torch.from_numpy(ABAR[t.numpy()]).view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x_star) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)
    return model_fn


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("num_steps", [1000, 50])
def test_oracle_on_delta_dataset(sampler, num_steps):
    x_star = torch.tensor([0.5, -0.25, 1.5], dtype=torch.float64).view(1, 3, 1, 1)
    noise = torch.randn(8, 3, 1, 1, generator=generator(5), dtype=torch.float64)
    seen = []
    x = GaussianDiffusion().sample(delta_oracle(x_star, seen), noise, sampler=sampler, num_steps=num_steps)
    torch.testing.assert_close(x, x_star.expand_as(x), rtol=0, atol=1e-9)
    assert seen == (list(range(T - 1, -1, -1)) if num_steps == 1000 else dit_respacing(50)[::-1])


def unit_gaussian_oracle(m):
    """Data N(m, 1): with x_t = a x0 + b eps and a^2 + b^2 = 1, E[eps | x_t] = b (x_t - a m) and the
    exact reverse variance is beta_t for every step (x_prev and x_t both have unit variance), so v = +1."""
    def model_fn(x, t):
        a = torch.from_numpy(np.sqrt(ABAR[t.numpy()])).view(-1, 1, 1, 1)
        return torch.cat([(1 - a ** 2).sqrt() * (x - a * m), torch.ones_like(x)], dim=1)
    return model_fn


@pytest.mark.parametrize("num_steps", [250, 100])
def test_ancestral_sampling_is_exact_for_gaussian_data(num_steps):
    m, n = 0.8, 20_000
    g = generator(6)
    noise = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64) + math.sqrt(ABAR[-1]) * m  # exact x_T
    x = GaussianDiffusion().sample(unit_gaussian_oracle(m), noise, sampler="ddpm", num_steps=num_steps,
                                   randn=seeded_randn(g)).flatten()
    # the last step returns E[x_0 | x at step 0], whose variance is 1 - Var[x_0 | x] = 1 - beta_0
    assert abs(x.mean().item() - m) < 5 / math.sqrt(n)
    assert abs(x.var().item() - (1 - BETAS[0])) < 5 * math.sqrt(2 / n)


@pytest.mark.parametrize("num_steps", [1000, 50])
def test_ddim_deterministic_map_for_gaussian_data(num_steps):
    # for N(m, 1) data, y = x_t - a_t m keeps unit variance; with theta_t = arccos(a_t) a DDIM step
    # rotates (a, b) to (a', b') and multiplies y by cos(theta_t - theta_prev); at the end theta = 0
    m = -0.4
    kept = list(range(T)) if num_steps == 1000 else dit_respacing(num_steps)
    theta = np.arccos(np.sqrt(np.concatenate([[1.0], ABAR[kept]])))
    gain = np.prod(np.cos(np.diff(theta)))
    noise = torch.randn(16, 1, 1, 1, generator=generator(7), dtype=torch.float64)
    x = GaussianDiffusion().sample(unit_gaussian_oracle(m), noise, sampler="ddim", num_steps=num_steps)
    ref = m + gain * (noise - math.sqrt(ABAR[-1]) * m)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-10)
    assert 0.95 < gain < 1                              # and it nearly preserves the variance


def test_ddim_eta_one_is_ancestral_with_posterior_variance():
    # Song et al. 2021 Sec. 4.1: eta = 1 gives the DDPM posterior, i.e. learned range with v = -1
    d = GaussianDiffusion(respacing=40)
    def model_fn(x, t):
        eps = torch.sin(3 * x) + t.view(-1, 1, 1, 1) / 1000
        return torch.cat([eps, -torch.ones_like(x)], dim=1)
    noise = torch.randn(5, 2, 3, 3, generator=generator(8), dtype=torch.float64)
    ddpm = d.p_sample_loop(model_fn, noise, seeded_randn(generator(9)))
    ddim = d.ddim_sample_loop(model_fn, noise, eta=1.0, randn=seeded_randn(generator(9)))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------
# Rectified flow
# ----------------------------------------------------------------------------

def test_rf_path_and_loss():
    rf = RectifiedFlow()
    x0 = torch.randn(3, 4, 2, 2, generator=generator(10))
    noise = torch.randn(3, 4, 2, 2, generator=generator(11))
    torch.testing.assert_close(rf.q_sample(x0, torch.zeros(3), noise), x0)
    torch.testing.assert_close(rf.q_sample(x0, torch.ones(3), noise), noise)
    torch.testing.assert_close(rf.q_sample(x0, torch.full((3,), 0.25), noise), 0.75 * x0 + 0.25 * noise)
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t = rf.q_sample(x0, t, noise)
    exact = torch.cat([noise - x0, torch.randn(3, 4, 2, 2)], dim=1)   # sigma channels are ignored
    assert rf.training_losses(exact, x0, x_t, t, noise)["loss"].abs().max() < 1e-12
    zero = rf.training_losses(torch.zeros(3, 8, 2, 2), x0, x_t, t, noise)
    torch.testing.assert_close(zero["rf"], ((noise - x0) ** 2).mean(dim=(1, 2, 3)))


def test_targets_are_what_the_output_predicts():
    # DDPM: the epsilon that Eq. 4 solves for from x_t; RF: dz_t/dt by a central difference.
    # float64: at t = 0 the division by sqrt(1 - abar_0) = 0.01 magnifies float32 rounding
    x0 = torch.randn(3, 4, 2, 2, generator=generator(12), dtype=torch.float64)
    noise = torch.randn(3, 4, 2, 2, generator=generator(13), dtype=torch.float64)
    ddpm, i = GaussianDiffusion(), torch.tensor([0, 500, 999])
    abar = ddpm.alphas_cumprod[i].view(-1, 1, 1, 1)
    eps = (ddpm.q_sample(x0, i, noise) - abar.sqrt() * x0) / (1 - abar).sqrt()
    torch.testing.assert_close(ddpm.target(x0, noise), eps, atol=0, rtol=1e-10)
    rf, t, h = RectifiedFlow(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), 1e-4
    velocity = (rf.q_sample(x0, t + h, noise) - rf.q_sample(x0, t - h, noise)) / (2 * h)
    torch.testing.assert_close(rf.target(x0, noise), velocity)


def test_rf_logit_normal_quantiles():
    n = 200_000
    torch.manual_seed(12)
    t, _, _ = RectifiedFlow().training_inputs(torch.zeros(n, 1, 1, 1, dtype=torch.float64))
    q = np.array([0.05, 0.25, 0.5, 0.75, 0.95])
    ref = 1 / (1 + np.exp(-stats.norm.ppf(q)))          # quantiles of sigmoid(N(0, 1))
    np.testing.assert_allclose(np.quantile(t.numpy(), q), ref, atol=0.004)
    assert t.dtype == torch.float64 and 0 < t.min() and t.max() < 1


def test_euler_integrates_known_fields():
    rf = RectifiedFlow()
    z1 = torch.randn(4, 2, 3, 3, generator=generator(13), dtype=torch.float64)
    # delta dataset at x*: the true velocity (z - x*) / t; each Euler step scales z - x* by (k-1)/k,
    # and the last (k = 1) lands on x* exactly
    x_star = torch.full((1, 2, 3, 3), 0.3, dtype=torch.float64)
    seen = []
    def delta_v(z, t):
        seen.append(t.tolist())
        return torch.cat([(z - x_star) / t.view(-1, 1, 1, 1)] * 2, dim=1)
    torch.testing.assert_close(rf.sample(delta_v, z1, num_steps=7), x_star.expand_as(z1), rtol=0, atol=1e-12)
    assert [s[0] for s in seen] == [k / 7 for k in range(7, 0, -1)] and all(len(set(s)) == 1 for s in seen)
    # v = t c: Euler from t = 1 with left-point t = k/n sums to c (n + 1) / (2n) (the integral is c / 2)
    c = torch.randn(1, 2, 3, 3, generator=generator(14), dtype=torch.float64)
    z0 = rf.sample(lambda z, t: t.view(-1, 1, 1, 1) * c, z1)
    torch.testing.assert_close(z0, z1 - c * 51 / 100, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------
# Host syncs, traced on fake CUDA tensors (and on meta) without a GPU
# ----------------------------------------------------------------------------

def device_model_fn(x, t):
    """A stand-in for the network that makes nothing on the CPU: eps and v from x and t."""
    eps = 0.5 * x + t.to(x.dtype).view(-1, 1, 1, 1) / 1000
    return torch.cat([eps, torch.zeros_like(x)], dim=1)  # (N, 2C, H, W)


# Autograd cannot run on fake CUDA tensors in a CPU build of torch: recording the graph aborts
# the process (autograd's InputMetadata asks for the missing CUDA device guard), so the backward
# of the losses is traced on meta only; its ops are device-generic.
BACKWARD = {"cuda": False, "meta": True}


def training_round(objective, x0, backward):
    """One training step's calls to the objective, and the loss's backward; returns the noise
    drawn, which the samplers then start from."""
    t, x_t, noise = objective.training_inputs(x0)
    out = torch.randn(x0.shape[0], 2 * x0.shape[1], *x0.shape[2:], device=x0.device,
                      requires_grad=backward)
    loss = objective.training_losses(out, x0, x_t, t, noise)["loss"].sum()
    if backward:
        loss.backward()
    return noise


def ddpm_round(d, x0, backward):
    """One training step's diffusion calls (and the loss's backward) and three samplers."""
    noise = training_round(d, x0, backward)
    d.sample(device_model_fn, noise, sampler="ddpm", num_steps=3)
    d.sample(device_model_fn, noise, sampler="ddim", num_steps=3, eta=1.0)
    d.p_sample_loop(device_model_fn, noise)  # the object's own schedule


@pytest.mark.parametrize("device", ["cuda", "meta"])
def test_ddpm_paths_are_free_of_host_syncs(device):
    d = GaussianDiffusion(respacing=4)  # made as usual: its tables are real CPU tensors
    with FakeTensorMode(allow_non_fake_inputs=True):
        x0 = torch.randn(2, 4, 8, 8, device=device)
        # first use: each schedule (this one and the 3-step one sample() respaces to) moves its
        # tables to the device once; the copies happen here and only here
        with CountSyncs() as first:
            ddpm_round(d, x0, BACKWARD[device])
        dev = str(x0.device)
        assert first.events == [("aten._to_copy.default", f"copy cpu -> {dev}")] * 2 * len(d.TABLES)
        # from then on: no copy, no .item(), no nonzero, no CPU tensor, in training or sampling
        with CountSyncs() as c:
            ddpm_round(d, x0, BACKWARD[device])
    assert c.events == [], c.report()
    assert c.async_copies == [] and c.host_outputs == []


def rf_round(rf, x0, backward):
    """Rectified flow's training calls (and the loss's backward) and its Euler sampler."""
    noise = training_round(rf, x0, backward)
    rf.sample(device_model_fn, noise, num_steps=3)


@pytest.mark.parametrize("device", ["cuda", "meta"])
def test_rectified_flow_is_free_of_host_syncs(device):
    rf = RectifiedFlow()
    with FakeTensorMode():
        x0 = torch.randn(2, 4, 8, 8, device=device)
        with CountSyncs() as c:
            rf_round(rf, x0, BACKWARD[device])
    assert c.events == [], c.report()
    assert c.async_copies == [] and c.host_outputs == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_syncs_on_a_real_gpu():
    # the same rounds on a GPU, with CUDA's own sync detector: a synchronizing call raises
    d = GaussianDiffusion(respacing=4)
    rf = RectifiedFlow()
    x0 = torch.randn(2, 4, 8, 8, device="cuda")
    ddpm_round(d, x0, backward=True)  # the first call moves the tables: a sync, once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ddpm_round(d, x0, backward=True)
        rf_round(rf, x0, backward=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_sync_counter_sees_what_syncs():
    # the counter itself: each way to make the host wait is recorded, device-only work is not
    # (on meta, where the Python indexing of a CPU build of torch accepts fake tensors); the fake
    # tensors refuse most of these ops, after the counter has seen them
    host = torch.arange(6.0).view(2, 3)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(2, 3, device="meta")
        ones = torch.ones(2, dtype=torch.long, device="meta")
        waits = [
            ("aten._local_scalar_dense.default", lambda: x.sum().item()),
            ("aten._local_scalar_dense.default", lambda: bool(x.sum() > 0)),
            ("aten.nonzero.default", lambda: torch.where(x > 0)),
            ("aten.masked_select.default", lambda: x.masked_select(x > 0)),
            ("aten._unique2.default", lambda: torch.unique(x)),
            ("aten.index.Tensor", lambda: x[x > 0]),
            ("aten.repeat_interleave.Tensor", lambda: ones.repeat_interleave(ones)),
            ("aten.equal.default", lambda: torch.equal(x, x)),
            ("aten.add.Tensor", lambda: x + host),
        ]
        for op, f in waits:
            with CountSyncs() as c:
                with pytest.raises(Exception):
                    f()
            assert [e[0] for e in c.events] == [op]
        with CountSyncs() as c:
            x[x > 0] = 1.0  # a masked write runs nonzero too, though the fake tensor lets it pass
            host.to(x.device)
            x.cpu()
            x.new_empty(2, 3).copy_(host)
        assert c.events == [("aten.index_put_.default", "boolean-mask indexing runs nonzero"),
                            ("aten._to_copy.default", "copy cpu -> meta"),
                            ("aten._to_copy.default", "copy meta -> cpu"),
                            ("aten.copy_.default", "copy cpu -> meta")]
        with CountSyncs() as c:
            host.to(x.device, non_blocking=True)
            index = torch.zeros(1, dtype=torch.long, device="meta")
            (x * 2.0 + x.exp() * torch.tensor(3.0)).index_select(0, index)
        assert c.events == [] and c.async_copies == [("aten._to_copy.default", "cpu -> meta")]
        assert c.host_outputs == ["aten.lift_fresh.default"]  # torch.tensor(3.0): a 0-dim CPU scalar


# ----------------------------------------------------------------------------
# Registry and bad input
# ----------------------------------------------------------------------------

def test_sampling_steps_default_to_the_objectives_own():
    seen = []
    GaussianDiffusion().sample(delta_oracle(torch.zeros(1, 1, 1, 1, dtype=torch.float64), seen),
                               torch.zeros(1, 1, 1, 1, dtype=torch.float64))
    assert seen == dit_respacing(GaussianDiffusion.default_steps)[::-1]  # 250, DiT's FID setting
    calls = []
    RectifiedFlow().sample(lambda z, t: calls.append(t) or torch.zeros_like(z), torch.zeros(1, 1, 1, 1))
    assert len(calls) == RectifiedFlow.default_steps == 50


def test_create_objective_and_bad_input():
    assert isinstance(create_objective("rf"), RectifiedFlow)
    assert create_objective("ddpm").num_timesteps == 1000
    assert create_objective("ddpm").schedule(250).timestep_map.tolist() == dit_respacing(250)
    assert create_objective("ddpm").schedule(1000).num_timesteps == 1000
    with pytest.raises(ValueError, match="use 2 or more steps"):
        create_objective("ddpm").schedule(1)
    with pytest.raises(ValueError, match="valid: ddpm, rf"):
        create_objective("edm")
    x = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="valid: ddpm, ddim"):
        create_objective("ddpm").sample(lambda x, t: x, x, sampler="euler")
    with pytest.raises(ValueError, match="valid: euler"):
        create_objective("rf").sample(lambda x, t: x, x, sampler="ddim")
