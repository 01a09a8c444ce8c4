r"""
FID, sFID, Inception Score, precision and recall of generated images, computed as
the ADM evaluator (openai/guided-diffusion) computes them for the DiT and DiT-MoE
papers' tables, in PyTorch and NumPy.

Both files are .npz with `arr_0` holding uint8 images (N, H, W, 3). SAMPLE is what
sample.py writes; REF is any such file or an ADM reference batch (e.g.
VIRTUAL_imagenet256_labeled.npz), whose stored mu / sigma / mu_s / sigma_s then
give FID and sFID while its images give precision and recall, as in ADM.
The network is the 2015 TF Inception of FID with pytorch-fid's port of its
weights, which this script does not download:
    wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

    python evaluate.py VIRTUAL_imagenet256_labeled.npz samples.npz
    python evaluate.py REF.npz SAMPLE.npz --inception PATH --out metrics.json \
        --cache-ref ref_stats.npz

Tests: python -m pytest -q tests/test_evaluate.py
"""
import launch  # noqa: I001  first import: the OpenMP wait policy must be set before torch loads

import argparse
import json
import os
import sys
import warnings
import zipfile
from dataclasses import dataclass
from functools import partial

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.special import xlogy
from tqdm import tqdm

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_NAME)
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")  # statistics an ADM reference batch stores

# ----------------------------------------------------------------------------
# Inception-v3, the 2015 FID graph
# ----------------------------------------------------------------------------

def tf_bilinear_resize(x, size):
    """TensorFlow 1's ResizeBilinear (align_corners=False), the graph's first op:
    output pixel i reads the input at i * in / out with no half-pixel offset
    (F.interpolate reads at (i + 0.5) * in / out - 0.5), clamped at the edge.
    x: (N, C, H, W) float, size: (H', W') -> (N, C, H', W')."""
    def taps(n_in, n_out):  # TF computes the scale and the positions in float32
        scale = torch.tensor(n_in, dtype=torch.float32) / n_out
        src = torch.arange(n_out, dtype=torch.float32, device=x.device) * scale.to(x.device)
        lo = src.long()  # positions are >= 0, so truncation is floor
        return lo, (lo + 1).clamp(max=n_in - 1), (src - lo).to(x.dtype)

    y0, y1, wy = taps(x.shape[2], size[0])
    x0, x1, wx = taps(x.shape[3], size[1])
    top = x[:, :, y0]  # (N, C, H', W)
    bottom = x[:, :, y1]
    # TF's order of operations: lerp along x in both rows, then along y
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * wx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * wx
    return top + (bottom - top) * wy[:, None]  # (N, C, H', W')


class BasicConv2d(nn.Module):
    """Every layer of the graph: conv without bias, BatchNorm with TF's eps, ReLU."""

    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


# TF's average pool leaves the zero padding out of the mean; the graph pools
# Mixed_7c's branch with max where the paper has average
avg_pool = partial(F.avg_pool2d, kernel_size=3, stride=1, padding=1, count_include_pad=False)
max_pool = partial(F.max_pool2d, kernel_size=3, stride=1, padding=1)
reduce_pool = partial(F.max_pool2d, kernel_size=3, stride=2)  # halves the grid
# factorised 7x7: kernel, stride, padding
ROW = ((1, 7), 1, (0, 3))
COL = ((7, 1), 1, (3, 0))


class Mixed(nn.Module):
    """An Inception block: branches concatenated along channels. A branch is
    (pool, chain, fork): optional pooling, a chain of convs, then optional convs
    side by side on the chain's output (Mixed_7b/c's 1x3 / 3x1 pairs). A conv is
    (name, c_in, c_out, kernel[, stride, padding]) with torchvision's names, so
    pytorch-fid's weight file loads as is."""

    def __init__(self, *branches):
        super().__init__()
        self.branches = []
        for pool, chain, fork in branches:
            for name, *conv in chain + fork:
                self.add_module(name, BasicConv2d(*conv))
            self.branches.append((pool, [c[0] for c in chain], [c[0] for c in fork]))

    def forward(self, x):
        outs = []
        for pool, chain, fork in self.branches:
            h = pool(x) if pool else x
            for name in chain:
                h = self._modules[name](h)
            outs.append(torch.cat([self._modules[name](h) for name in fork], 1) if fork else h)
        return torch.cat(outs, 1)


def block_a(c, c_pool):  # Mixed_5b-d, 35x35
    return Mixed((None, [("branch1x1", c, 64, 1)], []),
                 (None, [("branch5x5_1", c, 48, 1), ("branch5x5_2", 48, 64, 5, 1, 2)], []),
                 (None, [("branch3x3dbl_1", c, 64, 1), ("branch3x3dbl_2", 64, 96, 3, 1, 1),
                         ("branch3x3dbl_3", 96, 96, 3, 1, 1)], []),
                 (avg_pool, [("branch_pool", c, c_pool, 1)], []))


def block_b(c):  # Mixed_6a, 35x35 -> 17x17
    return Mixed((None, [("branch3x3", c, 384, 3, 2)], []),
                 (None, [("branch3x3dbl_1", c, 64, 1), ("branch3x3dbl_2", 64, 96, 3, 1, 1),
                         ("branch3x3dbl_3", 96, 96, 3, 2)], []),
                 (reduce_pool, [], []))


def block_c(c7):  # Mixed_6b-e, 17x17
    return Mixed((None, [("branch1x1", 768, 192, 1)], []),
                 (None, [("branch7x7_1", 768, c7, 1), ("branch7x7_2", c7, c7, *ROW),
                         ("branch7x7_3", c7, 192, *COL)], []),
                 (None, [("branch7x7dbl_1", 768, c7, 1), ("branch7x7dbl_2", c7, c7, *COL),
                         ("branch7x7dbl_3", c7, c7, *ROW), ("branch7x7dbl_4", c7, c7, *COL),
                         ("branch7x7dbl_5", c7, 192, *ROW)], []),
                 (avg_pool, [("branch_pool", 768, 192, 1)], []))


def block_d():  # Mixed_7a, 17x17 -> 8x8
    return Mixed((None, [("branch3x3_1", 768, 192, 1), ("branch3x3_2", 192, 320, 3, 2)], []),
                 (None, [("branch7x7x3_1", 768, 192, 1), ("branch7x7x3_2", 192, 192, *ROW),
                         ("branch7x7x3_3", 192, 192, *COL), ("branch7x7x3_4", 192, 192, 3, 2)], []),
                 (reduce_pool, [], []))


def block_e(c, pool):  # Mixed_7b-c, 8x8
    def fork(name):
        return [(name + "a", 384, 384, (1, 3), 1, (0, 1)),
                (name + "b", 384, 384, (3, 1), 1, (1, 0))]
    return Mixed((None, [("branch1x1", c, 320, 1)], []),
                 (None, [("branch3x3_1", c, 384, 1)], fork("branch3x3_2")),
                 (None, [("branch3x3dbl_1", c, 448, 1), ("branch3x3dbl_2", 448, 384, 3, 1, 1)],
                  fork("branch3x3dbl_3")),
                 (pool, [("branch_pool", c, 192, 1)], []))


class InceptionV3(nn.Module):
    """The FID Inception in torchvision's layout. Images in [0, 255], (N, 3, H, W)
    of any size, -> the ADM evaluator's three feature sets: pool3 (N, 2048) for
    FID, spatial (N, 2023) for sFID and bias-free logits (N, 1008) for IS."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = block_a(192, 32)
        self.Mixed_5c = block_a(256, 64)
        self.Mixed_5d = block_a(288, 64)
        self.Mixed_6a = block_b(288)
        self.Mixed_6b = block_c(128)
        self.Mixed_6c = block_c(160)
        self.Mixed_6d = block_c(160)
        self.Mixed_6e = block_c(192)
        self.Mixed_7a = block_d()
        self.Mixed_7b = block_e(1280, avg_pool)
        self.Mixed_7c = block_e(2048, max_pool)
        self.fc = nn.Linear(2048, 1008)  # the 2015 graph's 1008 classes, 1000 of them used

    def forward(self, x):
        x = (tf_bilinear_resize(x, (299, 299)) - 128) / 128  # (N, 3, 299, 299) in [-1, 1)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(reduce_pool(x)))  # (N, 192, 71, 71)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(reduce_pool(x))))  # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (N, 768, 17, 17)
        # sFID reads TF's 'mixed_6/conv', Mixed_6d's 1x1 branch: 7 channels flattened in NHWC order
        spatial = self.Mixed_6d.branch1x1(x)[:, :7].permute(0, 2, 3, 1).flatten(1)  # (N, 2023)
        x = self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))  # (N, 1280, 8, 8)
        pool3 = self.Mixed_7c(self.Mixed_7b(x)).mean((2, 3))  # (N, 2048)
        return pool3, spatial, pool3 @ self.fc.weight.T  # ADM's IS leaves out the fc bias


def load_inception(path, device):
    """InceptionV3 with pytorch-fid's weights, from `path` or, without one, from
    the current directory or torch hub's checkpoints (where pytorch-fid keeps it)."""
    places = ([path] if path
              else [WEIGHTS_NAME, os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)])
    found = [p for p in places if os.path.isfile(p)]
    if not found:
        raise FileNotFoundError(f"Inception weights {' or '.join(places)} not found: "
                                f"download {WEIGHTS_URL} and pass --inception PATH")
    model = InceptionV3()
    try:  # whatever fails here, the file is not the weights we need
        model.load_state_dict(torch.load(found[0], map_location="cpu", weights_only=True))
    except Exception as e:
        raise ValueError(f"{found[0]} does not hold the FID Inception weights "
                         f"({' '.join(str(e).split())[:200]})")
    torch.backends.cudnn.conv.fp32_precision = "ieee"  # the reference: float32 convolutions
    return model.eval().requires_grad_(False).to(device)

# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------

def psd_factor(s):
    """R with R R^T = s for a covariance s (n, n): its Cholesky factor (n, n) when s is
    positive definite to working precision, else (n, r) from its eigenvectors and the r
    eigenvalues above n eps max|eigenvalue|. Below that bound (numpy's matrix_rank rule)
    eigenvalues are rounding noise of exact zeros, as in the covariance of fewer samples
    than dimensions; kept, each would add about sqrt(eps) |S| to the distance."""
    n = len(s)
    tol = n * np.finfo(np.float64).eps
    try:
        root = np.linalg.cholesky(s)
        # Cholesky also succeeds on some singular covariances, whose noise pivots then go
        # through a square root: LAPACK's estimate of 1 / cond(s) rules them out
        rcond, _ = scipy.linalg.lapack.dpocon(root, np.abs(s).sum(0).max(), uplo="L")
        if rcond > tol:
            return root
    except np.linalg.LinAlgError:
        pass
    w, v = np.linalg.eigh(s)
    floor = tol * np.abs(w).max()
    if w.min() < -floor:
        raise ValueError(f"a covariance has eigenvalue {w.min():.3g} < 0: sqrt(S1 S2) is complex")
    keep = w > floor
    return v[:, keep] * np.sqrt(w[keep])  # (n, r)


def trace_sqrt_product(s1, s2):
    """tr sqrt(S1 S2) for covariances S1, S2. With S1 = R1 R1^T and S2 = R2 R2^T, S1 S2 is
    similar to K K^T, K = R1^T R2, so the trace is the sum of K's singular values."""
    r1 = psd_factor(s1)
    r2 = psd_factor(s2)
    k = r1.T @ r2  # (r1, r2)
    if k.shape == s1.shape:
        # both positive definite: K is nonsingular and the eigenvalues of K K^T (symmetric,
        # cheaper than an SVD) are its squared singular values, none of them noise
        return np.sqrt(np.linalg.eigvalsh(k @ k.T).clip(min=0)).sum()
    # a singular covariance can make K rank-deficient: an SVD gives its zero singular values
    # as ~eps |K|, where the roots of K K^T's eigenvalues would give ~sqrt(eps) |K|
    return np.linalg.svd(k, compute_uv=False).sum()


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Fréchet distance between N(mu1, S1) and N(mu2, S2), the FID of Heusel et
    al. 2017:  |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2),  in float64. ADM
    takes tr sqrt(S1 S2) from scipy.linalg.sqrtm of the non-symmetric product; we
    take it from square-root factors of S1 and S2 (trace_sqrt_product): as fast as the
    eigenvalues of one symmetric matrix, and exact-rank for singular covariances,
    whose rounding-noise eigenvalues sqrtm puts through square roots (~1e-8 each)."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if not (mu1.shape == mu2.shape and s1.shape == s2.shape == mu1.shape * 2):
        raise ValueError(f"statistics of different sizes: {mu1.shape} {s1.shape} "
                         f"vs {mu2.shape} {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("statistics contain NaN or infinity")
    try:
        tr_covmean = trace_sqrt_product(s1, s2)
    except np.linalg.LinAlgError:  # ADM's guard for a product it cannot root: eps on both diagonals
        warnings.warn(f"Fréchet distance: singular product, adding {eps} to the diagonals")
        offset = eps * np.eye(len(s1))
        tr_covmean = trace_sqrt_product(s1 + offset, s2 + offset)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def inception_score(probs, split_size=5000):
    """Inception Score (Salimans et al. 2016) as ADM computes it: consecutive
    splits of split_size samples (no shuffle), each scoring exp(mean KL(p(y|x) ||
    p(y))) with p(y) the split's marginal, averaged. probs: (N, classes)."""
    probs = np.asarray(probs, np.float64)
    scores = []
    for i in range(0, len(probs), split_size):
        p = probs[i:i + split_size]  # (n, classes)
        kl = (xlogy(p, p) - xlogy(p, p.mean(0, keepdims=True))).sum(1)  # xlogy: 0 log 0 = 0
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def tf_half_row_sums(x):
    """Row sums of float16 x (R, D) in float16, as TF's reduce_sum adds float16 on a GPU:
    there is no float32 accumulator, so every partial sum is rounded. Each of `threads`
    lanes (32: TF's warp-per-row kernel for D < 1024; 256: CUB's block reduce, which
    TF uses from D = 1024 and which reads D <= 4096 this way) adds the elements lane,
    lane + threads, ... in turn; each warp of 32 lanes adds its lanes as a pairwise
    tree (CUB's shuffle-down reduce); the warps' sums are added in turn."""
    threads = 32 if x.shape[1] < 1024 else 256
    pad = -x.shape[1] % threads  # zeros add exactly, like the lanes CUB leaves out
    lanes = F.pad(x, (0, pad)).unflatten(1, (-1, threads))  # (R, D / threads, threads)
    s = lanes[:, 0]
    for column in lanes.unbind(1)[1:]:  # each thread's elements, in turn
        s = s + column  # (R, threads)
    s = s.unflatten(1, (-1, 32))  # (R, warps, 32)
    while s.shape[2] > 1:  # neighbours, then pairs of pairs, ...
        s = s[..., 0::2] + s[..., 1::2]
    total = s[:, 0, 0]
    for w in range(1, s.shape[1]):  # the warps, in turn
        total = total + s[:, w, 0]
    return total  # (R,)


def squared_distances(a, b):
    """(R, D), (S, D) float32 -> (R, S) float32: |a|^2 - 2 a.b + |b|^2, rounded where ADM's
    evaluator (TF on a GPU) rounds: the features are cast to float16; each square is
    rounded to float16 and summed in float16 (tf_half_row_sums); a.b is accumulated in
    float32 and rounded to float16 once (cuBLAS); 2 a.b, the difference and the sum are
    each rounded to float16; negatives become 0 (also -inf, where only 2 a.b overflows).
    A block holding inf or NaN is recomputed in float32, as ADM recomputes it."""
    a16 = a.half()
    b16 = b.half()
    dot = (a16.float() @ b16.float().T).half()  # (R, S)
    d = tf_half_row_sums(a16 * a16)[:, None] - 2 * dot + tf_half_row_sums(b16 * b16)[None]
    d = d.float().clamp_(min=0)
    if not torch.isfinite(d).all():
        d = (a.square().sum(1)[:, None] - 2 * a @ b.T + b.square().sum(1)[None]).clamp_(min=0)
    return d


def manifold_radii(feats, k, block_size):
    """(N, D) -> (N,): squared distance of each point to its k-th nearest other
    point, the radius of its ball, keeping a running k + 1 smallest per row over
    blocks of block_size^2 distances (the point itself comes first, at 0)."""
    radii = []
    for i in range(0, len(feats), block_size):
        nearest = feats.new_empty(len(feats[i:i + block_size]), 0)
        for j in range(0, len(feats), block_size):
            d = torch.cat([nearest, squared_distances(feats[i:i + block_size],
                                                      feats[j:j + block_size])], 1)
            nearest = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def precision_recall(ref_feats, sample_feats, k=3, block_size=10000, device="cpu"):
    """Improved precision and recall (Kynkäänniemi et al. 2019) as in ADM: every
    point has a ball reaching its k-th nearest neighbour in its own set;
    precision = fraction of samples inside some reference ball, recall = fraction
    of reference points inside some sample ball. Returns (precision, recall).
    Distances come in blocks of block_size^2, ADM's 10000 by default, so that the
    float32 fallback of squared_distances is decided over the same blocks."""
    ref, smp = (torch.as_tensor(np.asarray(f), dtype=torch.float32, device=device)
                for f in (ref_feats, sample_feats))
    if min(len(ref), len(smp)) <= k:
        raise ValueError(f"precision/recall with k = {k} need more than {k} points in each set")
    ref_r = manifold_radii(ref, k, block_size)
    smp_r = manifold_radii(smp, k, block_size)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    smp_in = torch.zeros(len(smp), dtype=torch.bool, device=device)
    for i in range(0, len(ref), block_size):
        for j in range(0, len(smp), block_size):
            d = squared_distances(ref[i:i + block_size], smp[j:j + block_size])  # (R, S)
            smp_in[j:j + block_size] |= (d <= ref_r[i:i + block_size, None]).any(0)
            ref_in[i:i + block_size] |= (d <= smp_r[None, j:j + block_size]).any(1)
    return smp_in.float().mean().item(), ref_in.float().mean().item()

# ----------------------------------------------------------------------------
# Image files and features
# ----------------------------------------------------------------------------

@dataclass
class NpzImages:
    """The uint8 (N, H, W, 3) arr_0 of an .npz, read batch by batch from the zip
    member so that 50k samples need not fit in memory, and the file's stored
    statistics (empty if none)."""
    path: str
    shape: tuple
    header_bytes: int
    stats: dict

    def batches(self, batch_size):
        n = self.shape[0]
        image_bytes = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            f.read(self.header_bytes)
            for i in range(0, n, batch_size):
                b = min(batch_size, n - i)
                yield (np.frombuffer(bytearray(f.read(b * image_bytes)), np.uint8)
                       .reshape(b, *self.shape[1:]))


def load_npz(path):
    """Open an image .npz, checking that arr_0 holds uint8 images (N, H, W, 3)."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not an .npz file") from None
    with zf:
        if "arr_0.npy" not in zf.namelist():
            raise ValueError(f"{path} has no arr_0 (expected uint8 images of shape (N, H, W, 3))")
        with zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"{path}: unsupported .npy format version {version} for arr_0")
            shape, fortran, dtype = getattr(np.lib.format, "read_array_header_%d_0" % version[0])(f)
            header_bytes = f.tell()
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
        raise ValueError(f"{path}: arr_0 is {dtype} {shape}{' in Fortran order' * fortran}, "
                         "expected uint8 images (N, H, W, 3)")
    with np.load(path) as npz:
        stored = [key for key in STAT_KEYS if key in npz.files]
        if 0 < len(stored) < len(STAT_KEYS):
            raise ValueError(f"{path} stores {', '.join(stored)} but not all of "
                             f"{', '.join(STAT_KEYS)}")
        stats = {key: npz[key].astype(np.float64) for key in stored}
    return NpzImages(path, shape, header_bytes, stats)


@torch.no_grad()
def extract(model, images, batch_size, device, name):
    """pool3 (N, 2048), spatial (N, 2023) and probs (N, 1008) of every image, with
    the FID / sFID statistics: the file's stored ones if it has them, as in ADM."""
    feats = {"pool": [], "spatial": [], "probs": []}
    with tqdm(total=images.shape[0], desc=f"Inception features of {name}", unit="img") as bar:
        for batch in images.batches(batch_size):
            # (N, 3, H, W) in [0, 255]
            x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float()
            pool, spatial, logits = model(x)
            for key, value in zip(feats, (pool, spatial, logits.softmax(1))):
                feats[key].append(value.cpu().numpy())
            bar.update(len(batch))
    feats = {key: np.concatenate(value) for key, value in feats.items()}
    if images.stats:
        return feats | images.stats
    # mean and covariance (np.cov: normalised by N - 1) in float64, as in ADM
    pool = feats["pool"].astype(np.float64)
    spatial = feats["spatial"].astype(np.float64)
    return feats | {"mu": pool.mean(0), "sigma": np.cov(pool, rowvar=False),
                    "mu_s": spatial.mean(0), "sigma_s": np.cov(spatial, rowvar=False)}


def open_output(path, flag, mode="wb"):
    """open() for an output file; its OSError (a read-only place, under a regular file,
    /proc, a directory, a full disk) becomes one line naming the flag and the path."""
    try:
        return open(path, mode)
    except OSError as e:
        raise ValueError(f"cannot write {flag} {path}: {e.strerror or e}") from None


def check_output(path, flag):
    """Fail now, not after the slow part, if the output `path` cannot be written: open it
    for appending (which keeps an existing file) and remove it again if this created it."""
    existed = os.path.lexists(path)
    open_output(path, flag, "ab").close()
    if not existed:
        os.remove(path)


def evaluate(ref_path, sample_path, inception, batch_size, device, cache_ref=None, k=3):
    """The five metrics of SAMPLE against REF (or against REF's cached features).
    Every input, and the cache to be written, is checked before the slow part starts."""
    sample = load_npz(sample_path)
    cached = cache_ref is not None and os.path.exists(cache_ref)
    if cached:
        try:
            with np.load(cache_ref) as npz:
                ref = {key: npz[key] for key in npz.files}
        except (ValueError, EOFError, zipfile.BadZipFile):  # not an npz, or a truncated one
            ref = {}
        if not {"pool", "image_size", *STAT_KEYS} <= ref.keys():
            raise ValueError(f"{cache_ref} is not a reference cache written by evaluate.py")
        print(f"reading the reference's features from {cache_ref}, not {ref_path}", file=sys.stderr)
        ref_size = tuple(ref["image_size"])
        n_ref = len(ref["pool"])
    else:
        ref_images = load_npz(ref_path)
        ref_size = ref_images.shape[1:3]
        n_ref = ref_images.shape[0]
        if cache_ref:
            check_output(cache_ref, "--cache-ref")
    if ref_size != sample.shape[1:3]:
        raise ValueError(f"reference images are {ref_size[0]}x{ref_size[1]} but samples are "
                         f"{sample.shape[1]}x{sample.shape[2]}")
    for name, n in (("reference", n_ref), ("sample", sample.shape[0])):
        if n <= k:
            raise ValueError(f"{name} set has {n} images; precision/recall (k = {k}) need "
                             f"at least {k + 1}")

    model = load_inception(inception, device)
    if not cached:
        ref = extract(model, ref_images, batch_size, device, "reference")
        if cache_ref:  # through a file object: np.savez would add .npz to a name without it
            stats = {key: ref[key] for key in STAT_KEYS}
            with open_output(cache_ref, "--cache-ref") as f:
                np.savez(f, pool=ref["pool"], image_size=ref_size, **stats)
    smp = extract(model, sample, batch_size, device, "samples")
    precision, recall = precision_recall(ref["pool"], smp["pool"], k=k, device=device)
    return {"inception_score": inception_score(smp["probs"]),
            "fid": frechet_distance(smp["mu"], smp["sigma"], ref["mu"], ref["sigma"]),
            "sfid": frechet_distance(smp["mu_s"], smp["sigma_s"], ref["mu_s"], ref["sigma_s"]),
            "precision": precision, "recall": recall, "num_samples": sample.shape[0]}

# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

def check_device(name):
    """torch.device(name), if this machine can allocate on it."""
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # AssertionError: a torch built without CUDA
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {name}, but torch sees no CUDA device") from None
        raise ValueError(f"--device {name}: {str(e).splitlines()[0]}") from None
    return device


def main():
    parser = launch.Parser(description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref", help="reference .npz: arr_0 images, optionally stored "
                                    "mu / sigma / mu_s / sigma_s")
    parser.add_argument("sample",
                        help="sample .npz from sample.py: arr_0 uint8 images (N, H, W, 3)")
    parser.add_argument("--inception", default=None,
                        help=f"path of {WEIGHTS_NAME} "
                             "(default: ./ then $TORCH_HOME/hub/checkpoints/)")
    parser.add_argument("--batch-size", type=launch.positive_int, default=100,
                        help="images per Inception forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available)")
    parser.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--cache-ref", default=None,
                        help="npz of REF's features and statistics: written when absent, "
                             "else read instead of REF")
    args = parser.parse_args()
    try:
        # the arguments and the outputs are checked before the weights load
        device = check_device(args.device)
        if args.out:
            check_output(args.out, "--out")
        metrics = evaluate(args.ref, args.sample, args.inception, args.batch_size, device,
                           args.cache_ref)
        for label, key in (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
                           ("Precision", "precision"), ("Recall", "recall")):
            print(f"{label}: {metrics[key]:.4f}")
        if args.out:
            with open_output(args.out, "--out", "w") as f:
                json.dump(metrics | {"ref": args.ref, "sample": args.sample}, f, indent=2)
    except (OSError, ValueError) as e:
        launch.fail(e)


if __name__ == "__main__":
    main()
