"""
The training data: the built-in digits, an image folder encoded by the Stable Diffusion VAE
on the fly, or latent shards that --extract-latents writes once (the ImageNet path).

    python train.py                                               # digits, pixels, no VAE
    python train.py --data-path /data/imagenet/train              # images -> VAE -> latents
    torchrun --nproc_per_node=8 train.py --extract-latents --data-path /data/imagenet/train \
        --latents-path /data/in256                                # encode once ...
    python train.py --latents-path /data/in256                    # ... then train without the VAE

setup_data() hands train.py a dataset of raw items and an `encode` that turns a batch of them
into the model's x0 on the device, drawing flips and posterior samples from the seeded RNG.
Unusable data (a missing shard, a corrupt image, malformed meta.json) raises DataError with a
one-line message naming the file. The VAE needs diffusers (pip install -r requirements-vae.txt),
imported only when a latent model is trained or sampled.

Tests: python -m pytest -q tests/test_train.py
"""
import bisect
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm import tqdm

from launch import fail

SHARD_SIZE = 10_000  # images per latent shard file
VAE = "stabilityai/sd-vae-ft-ema"  # the paper's VAE: the default of train.py and sample.py


class DataError(ValueError):
    """Data that cannot be used; the message is one line naming the file."""


def load_digits(split="all"):
    """scikit-learn's 1,797 real 8x8 digits (ink 0..16) as pixels in [-1, 1], (N, 1, 8, 8).
    split: "all", "train" (all but every 5th) or "held-out" (every 5th: 359 digits never trained
    on, for compare.py's classifier). Read from the file scikit-learn ships (importing
    sklearn.datasets costs ~3 s a start), else through scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise DataError("the built-in digits need scikit-learn: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        table = np.loadtxt(path, delimiter=",")  # (1797, 65): 64 pixels, the label
        images = table[:, :-1].reshape(-1, 8, 8)
        labels = table[:, -1].astype(np.int64)
    else:
        from sklearn.datasets import load_digits as sklearn_digits
        digits = sklearn_digits()
        images = digits.images
        labels = digits.target
    keep = {"all": slice(None), "train": np.arange(len(labels)) % 5 != 4,
            "held-out": np.arange(len(labels)) % 5 == 4}[split]
    x = torch.tensor(images[keep], dtype=torch.float32).unsqueeze(1) / 8 - 1
    return TensorDataset(x, torch.tensor(labels[keep]))


def center_crop(img, size):
    # ADM's recipe, as DiT: halve with a box filter while the short side is >= 2 * size (cheap
    # anti-aliasing), bicubic to the exact short side, then the center square.
    from PIL import Image
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), Image.BICUBIC)
    left = (img.width - size) // 2
    top = (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


class ImageFolder(Dataset):
    """root/<class>/<image>, classes sorted by name; items: uint8 (3, S, S) center crops, label."""
    def __init__(self, root, size):
        self.classes = sorted(d.name for d in Path(root).iterdir() if d.is_dir())
        self.files = [(f, i) for i, c in enumerate(self.classes)
                      for f in sorted((Path(root) / c).iterdir())
                      if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp")]
        if not self.files:
            raise DataError(f"{root} holds no images in class sub-folders "
                            f"(ImageNet layout: {root}/<class>/<image>.jpg)")
        self.size = size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        # A file that cannot be decoded stops the run naming it, rather than being skipped: a
        # skipped image would shift every later micro-batch and break exact resumption.
        from PIL import Image
        path, label = self.files[i]
        try:
            img = center_crop(Image.open(path).convert("RGB"), self.size)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {path} ({e}); replace or delete it, "
                            "then --resume") from None
        return torch.from_numpy(np.array(img)).permute(2, 0, 1), label


class LatentShards(Dataset):
    """The shards of --extract-latents, memory-mapped. Item: (2, 2, C, h, w) = (posterior mean, std)
    x (image, its mirror image), scaled; flips and posterior samples are drawn at train time."""
    def __init__(self, root):
        root = Path(root)
        try:
            self.meta = json.loads((root / "meta.json").read_text())
            absent = [k for k in ("latent_size", "channels", "classes") if k not in self.meta]
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            absent = [f"valid JSON ({type(e).__name__})"]
        if absent:
            raise DataError(f"{root / 'meta.json'} is not the metadata --extract-latents writes "
                            f"(no {', '.join(absent)})")
        # older sets list no shards: then whatever shard files are there
        listed = self.meta.get("shards") or {f.name: None for f in sorted(root.glob("shard-*.pt"))}
        missing = [name for name in listed if not (root / name).is_file()]
        if missing or not listed:
            raise DataError(f"{root}: {len(missing)} of the {len(listed)} latent shards listed in "
                            f"meta.json are not here (e.g. {(missing or ['shard-*.pt'])[0]}); "
                            "every node needs every shard")
        self.shards = [load_shard(root / name, count) for name, count in listed.items()]
        self.ends = np.cumsum([len(s["label"]) for s in self.shards]).tolist()

    def __len__(self):
        return self.ends[-1]

    def __getitem__(self, i):
        k = bisect.bisect_right(self.ends, i)
        s = self.shards[k]
        j = i - (self.ends[k - 1] if k else 0)
        return torch.stack([s["mean"][j], s["std"][j]]), s["label"][j]


def load_shard(path, count):
    """One latent shard, memory-mapped, checked to hold what --extract-latents wrote."""
    try:
        shard = torch.load(path, mmap=True, weights_only=True)
        if not {"mean", "std", "label"} <= set(shard):
            raise ValueError(f"keys {sorted(shard)}")
        if count is not None and len(shard["label"]) != count:
            raise ValueError(f"{len(shard['label'])} images where meta.json lists {count}")
    except Exception as e:  # not a zip of tensors, a pickle of other objects, other keys
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise DataError(f"{path} is not a latent shard of --extract-latents ({why})") from None
    return shard


def load_vae(name, device):
    """The Stable Diffusion VAE (diffusers AutoencoderKL, hub name or local folder), frozen."""
    try:
        from diffusers import AutoencoderKL  # only latent models need it, and it imports slowly
    except ImportError:
        raise DataError("the VAE of latent models needs diffusers: "
                        "pip install -r requirements-vae.txt") from None
    try:
        return AutoencoderKL.from_pretrained(name).to(device).eval().requires_grad_(False)
    except Exception as e:  # offline hub, wrong path, not a VAE: all end the same way for the user
        raise DataError(f"cannot load the VAE {name!r} ({type(e).__name__}); "
                        f"pass --vae PATH to a local copy of {VAE}, "
                        "or allow the download from the Hugging Face hub") from None


def latent_shape(vae, image_size):
    """(channels, size) of the latents of image_size images (SD: 4, image_size / 8)."""
    return vae.config.latent_channels, image_size // 2 ** (len(vae.config.block_out_channels) - 1)


def setup_data(data_path, latents_path, image_size, vae_name, device, digits="all"):
    """(dataset, encode, fields): latent shards, else an image folder through the VAE, else the
    digits (digits: which split, see load_digits). encode maps a raw batch on the device to the
    model's input x0 with the seeded RNG; fields are the model config's input_size, in_channels,
    num_classes and latent_space."""
    if latents_path:
        if not (Path(latents_path) / "meta.json").is_file():
            raise DataError(f"no latent shards in {latents_path} "
                            "(write them with --extract-latents)")
        data = LatentShards(latents_path)
        def encode(x):  # (N, 2, 2, C, h, w): the image or its flip, then z = mean + std * eps
            x = x.float()
            flip = (torch.rand(len(x), device=x.device) < 0.5).long()
            # each (N, C, h, w)
            mean, std = x[torch.arange(len(x), device=x.device), :, flip].unbind(1)
            return mean + std * torch.randn_like(std)
        m = data.meta
        return data, encode, dict(input_size=m["latent_size"], in_channels=m["channels"],
                                  num_classes=len(m["classes"]), latent_space=True)
    if data_path:
        data = ImageFolder(data_path, image_size)
        vae = load_vae(vae_name, device)
        channels, size = latent_shape(vae, image_size)
        @torch.no_grad()
        def encode(x):
            # uint8 -> [-1, 1], flip half (the paper's only augmentation), posterior sample
            x = x.float() / 127.5 - 1
            x = torch.where((torch.rand(len(x), device=x.device) < 0.5).view(-1, 1, 1, 1),
                            x.flip(-1), x)
            return vae.encode(x).latent_dist.sample() * vae.config.scaling_factor  # SD: 0.18215
        return data, encode, dict(input_size=size, in_channels=channels,
                                  num_classes=len(data.classes), latent_space=True)
    # no flips for digits: a mirrored digit is a different glyph
    return load_digits(digits), lambda x: x, dict(input_size=8, in_channels=1, num_classes=10,
                                            latent_space=False)


@torch.no_grad()
def extract_latents(data_path, latents_path, image_size, vae_name, batch_size, num_workers, rank,
                    world, device):
    """Encode an image folder once: the scaled posterior mean and std of each image and of its
    mirror image. Process r encodes images r, r + world, ... into its own shards; meta.json,
    written last by rank 0, lists every shard."""
    out = Path(latents_path)
    if any(out.glob("shard-*.pt")):
        fail(f"{out} already holds latent shards; choose an empty folder")
    if world > 1:
        dist.barrier()  # every rank has looked before any rank writes
    try:
        data = ImageFolder(data_path, image_size)
        vae = load_vae(vae_name, device)
    except DataError as e:
        fail(e)
    channels, size = latent_shape(vae, image_size)
    out.mkdir(parents=True, exist_ok=True)
    loader = DataLoader(data, batch_size, sampler=range(rank, len(data), world),
                        num_workers=num_workers)
    scale = vae.config.scaling_factor
    parts = []
    written = {}  # shard file name -> images
    for i, (x, y) in enumerate(tqdm(loader, desc="encoding", disable=rank != 0)):
        x = x.to(device).float() / 127.5 - 1
        post = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist  # both orientations in one call
        stack = lambda v: torch.stack((v * scale).chunk(2), 1).half().cpu()  # (N, 2, C, h, w)
        parts.append((stack(post.mean), stack(post.std), y))
        if sum(len(p[2]) for p in parts) >= SHARD_SIZE or i == len(loader) - 1:
            mean, std, label = (torch.cat(p) for p in zip(*parts))
            name = f"shard-{rank:03d}-{len(written):05d}.pt"
            torch.save({"mean": mean, "std": std, "label": label}, out / name)
            written[name] = len(label)
            parts = []
    everyone = [written]
    if world > 1:  # every rank's shards, for a meta.json that names them all
        everyone = [None] * world
        dist.all_gather_object(everyone, written)
    if rank == 0:  # written last: its presence means every shard is complete
        shards = dict(sorted(kv for w in everyone for kv in w.items()))
        meta = dict(image_size=image_size, latent_size=size, channels=channels,
                    classes=data.classes, vae=vae_name, count=len(data), shards=shards)
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
        print(f"wrote latents of {len(data)} images and their flips to {out}")
