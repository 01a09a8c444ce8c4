"""
Tests of diffusion.py against independent computations: closed forms written in numpy,
Gaussian conditioning, numerical integration, scipy's normal CDF and sharp Monte Carlo.

    python -m pytest -q tests/test_diffusion.py
"""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from diffusion import (GaussianDiffusion, RectifiedFlow, create_objective,
                       discretized_gaussian_log_likelihood, normal_kl)

T = 1000
BETAS = np.linspace(1e-4, 2e-2, T)       # Ho et al. 2020 linear schedule, written out here
ABAR = np.cumprod(1 - BETAS)             # alpha-bar_t = prod_{s <= t} (1 - beta_s)


def dit_respacing(n):
    """DiT's space_timesteps(1000, str(n)): a float stride accumulated from 0, rounded."""
    stride, cur, kept = (T - 1) / (n - 1), 0.0, []
    for _ in range(n):
        kept.append(round(cur))
        cur += stride
    return kept


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


def test_discretized_log_likelihood_against_scipy():
    x = np.linspace(-1, 1, 256)                           # the 256 levels, both edges included
    rng = np.random.default_rng(1)
    log_scale = rng.uniform(-6, 0.5, size=256)
    scale = np.exp(log_scale)
    # means within a few standard deviations of x, and eight far away where P < 1e-12 is clamped
    z = rng.normal(scale=2, size=256)
    z[100:108] = 60
    mean = x - scale * z
    with np.errstate(divide="ignore"):
        ref = np.log(stats.norm.cdf(x + 1 / 255, mean, scale) - stats.norm.cdf(x - 1 / 255, mean, scale))
    ref[0] = stats.norm.logcdf(x[0] + 1 / 255, mean[0], scale[0])       # left edge bin: (-inf, -1 + 1/255]
    ref[-1] = stats.norm.logsf(x[-1] - 1 / 255, mean[-1], scale[-1])    # right edge bin: [1 - 1/255, inf)
    out = discretized_gaussian_log_likelihood(*(torch.from_numpy(a) for a in (x, mean, log_scale)))
    np.testing.assert_allclose(out.numpy(), np.maximum(ref, np.log(1e-12)), rtol=1e-9, atol=1e-12)


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
    for bad in (0, 1, 1001):
        with pytest.raises(ValueError, match="respacing"):
            GaussianDiffusion(respacing=bad)


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
    t, x_t, noise = d.training_inputs(x0, generator(4))
    assert t.dtype == torch.long and set(t.tolist()) <= set(dit_respacing(250))
    assert len(set(t.tolist())) > 200                   # uniform over the 250 kept steps
    a = torch.from_numpy(np.sqrt(ABAR[t.numpy()])).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a * x0 + (1 - a ** 2).sqrt() * noise, rtol=1e-5, atol=1e-5)


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
@pytest.mark.parametrize("num_steps", [None, 50])
def test_oracle_on_delta_dataset(sampler, num_steps):
    x_star = torch.tensor([0.5, -0.25, 1.5], dtype=torch.float64).view(1, 3, 1, 1)
    noise = torch.randn(8, 3, 1, 1, generator=generator(5), dtype=torch.float64)
    seen = []
    x = GaussianDiffusion().sample(delta_oracle(x_star, seen), noise, sampler=sampler, num_steps=num_steps)
    torch.testing.assert_close(x, x_star.expand_as(x), rtol=0, atol=1e-9)
    assert seen == (list(range(T - 1, -1, -1)) if num_steps is None else dit_respacing(50)[::-1])


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


@pytest.mark.parametrize("num_steps", [None, 50])
def test_ddim_deterministic_map_for_gaussian_data(num_steps):
    # for N(m, 1) data, y = x_t - a_t m keeps unit variance; with theta_t = arccos(a_t) a DDIM step
    # rotates (a, b) to (a', b') and multiplies y by cos(theta_t - theta_prev); at the end theta = 0
    m = -0.4
    kept = list(range(T)) if num_steps is None else dit_respacing(num_steps)
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
    x0 = torch.randn(3, 4, 2, 2, generator=generator(12))
    noise = torch.randn(3, 4, 2, 2, generator=generator(13))
    ddpm, i = GaussianDiffusion(), torch.tensor([0, 500, 999])
    abar = ddpm.alphas_cumprod[i].float().view(-1, 1, 1, 1)
    eps = (ddpm.q_sample(x0, i, noise) - abar.sqrt() * x0) / (1 - abar).sqrt()
    torch.testing.assert_close(ddpm.target(x0, noise), eps, atol=1e-4, rtol=1e-4)
    rf, t, h = RectifiedFlow(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), 1e-4
    x0, noise = x0.double(), noise.double()
    velocity = (rf.q_sample(x0, t + h, noise) - rf.q_sample(x0, t - h, noise)) / (2 * h)
    torch.testing.assert_close(rf.target(x0, noise), velocity)


def test_rf_logit_normal_quantiles():
    n = 200_000
    t, _, _ = RectifiedFlow().training_inputs(torch.zeros(n, 1, 1, 1, dtype=torch.float64), generator(12))
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
# Registry and bad input
# ----------------------------------------------------------------------------

def test_create_objective_and_bad_input():
    assert isinstance(create_objective("rf"), RectifiedFlow)
    assert create_objective("rf", 20).num_sampling_steps == 20
    assert create_objective("ddpm").num_timesteps == 1000
    assert create_objective("ddpm", 250).timestep_map.tolist() == dit_respacing(250)
    with pytest.raises(ValueError, match="valid: ddpm, rf"):
        create_objective("edm")
    x = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="valid: ddpm, ddim"):
        create_objective("ddpm").sample(lambda x, t: x, x, sampler="euler")
    with pytest.raises(ValueError, match="valid: euler"):
        create_objective("rf").sample(lambda x, t: x, x, sampler="ddim")
