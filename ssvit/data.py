"""Data on Hugging Face datasets: synthetic | parquet:PATH | imagefolder:DIR | hub names.

Images reach the model as uint8 (3, S, S) tensors; the loop turns them into [0, 1] floats on the device.
Datasets that fit in memory at the training resolution (CIFAR, the synthetic set) are decoded once into a
uint8 tensor cache, kept on disk under ``~/.cache/ssvit`` keyed by the dataset's fingerprint, so that on
2 CPU cores the input pipeline is never what the model waits for. Larger ones decode per sample.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

CACHE_DIR = Path(os.environ.get("SSVIT_CACHE", Path.home() / ".cache" / "ssvit"))
MAX_CACHE_BYTES = 4 * 2**30


# --------------------------------------------------------------------------------------------------------------
# The built-in synthetic dataset


SYNTHETIC_CLASSES = (
    "disc", "square", "triangle", "ring", "cross",
    "horizontal_stripes", "vertical_stripes", "checkerboard", "two_halves", "gradient",
)  # fmt: skip


def synthetic_images(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Procedural images whose class is a visual concept (a shape, a texture or a layout) drawn in random
    colours on a random background, at a random position and scale: labels need shape, and the masked-patch
    colour targets need context (the colour of a hidden patch follows from its neighbours and the shape).
    Deterministic from the seed. Returns uint8 images (n, 3, size, size) and int64 labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(SYNTHETIC_CLASSES)
    labels = labels[torch.randperm(n, generator=g)]
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    cx, cy = (u(n, 1, 1) - 0.5) * 0.8, (u(n, 1, 1) - 0.5) * 0.8
    r = 0.35 + 0.35 * u(n, 1, 1)
    x, y = xs - cx, ys - cy
    freq = 3 + (u(n, 1, 1) * 4).floor()
    angle = u(n, 1, 1) * math.pi
    shapes = torch.stack(
        [
            x**2 + y**2 < r**2,  # disc
            (x.abs() < r * 0.8) & (y.abs() < r * 0.8),  # square
            (y < r * 0.7) & (y > -r * 0.7 + 2 * x.abs() * 1.2),  # triangle
            ((x**2 + y**2).sqrt() - r * 0.8).abs() < r * 0.25,  # ring
            ((x.abs() < r * 0.25) | (y.abs() < r * 0.25)) & (x.abs() < r) & (y.abs() < r),  # cross
            torch.sin(ys * freq * math.pi) > 0,  # horizontal stripes
            torch.sin(xs * freq * math.pi) > 0,  # vertical stripes
            (torch.sin(xs * freq * math.pi) > 0) ^ (torch.sin(ys * freq * math.pi) > 0),  # checkerboard
            (xs * torch.cos(angle) + ys * torch.sin(angle)) > cx,  # two halves split by a line
            torch.zeros(n, size, size, dtype=torch.bool),  # gradient (drawn below)
        ],
        dim=1,
    )
    mask = shapes[torch.arange(n), labels].float()[:, None]  # (n, 1, S, S)
    fg, bg = u(n, 3, 1, 1), u(n, 3, 1, 1)
    # keep foreground and background apart so that the shape is visible
    fg = torch.where((fg - bg).abs().sum(1, keepdim=True) < 0.6, 1 - bg, fg)
    ramp = ((xs * torch.cos(angle) + ys * torch.sin(angle)) / 2.9 + 0.5).clamp(0, 1)[:, None]
    is_gradient = (labels == SYNTHETIC_CLASSES.index("gradient")).view(n, 1, 1, 1)
    img = torch.where(is_gradient, bg * (1 - ramp) + fg * ramp, fg * mask + bg * (1 - mask))
    img = img + 0.04 * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels


# --------------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class Splits:
    train: "ImageDataset"
    val: "ImageDataset"
    num_classes: int
    class_names: list[str]
    description: str


def _load_hf(spec: str):
    """A DatasetDict from --data. Local paths are checked first so a typo is an error, not a download."""
    import datasets

    kind, _, path = spec.partition(":")
    if kind == "parquet":
        p = Path(path)
        if p.is_dir():
            files = {}
            for split, names in (("train", "train"), ("validation", "valid*"), ("test", "test")):
                found = sorted(str(f) for f in p.rglob(f"{names}*.parquet"))
                if found:
                    files[split] = found
            if not files:
                raise FileNotFoundError(f"--data {spec}: no train*.parquet file under {p} (hub layout expected)")
        elif p.is_file() or any(ch in path for ch in "*?["):
            files = {"train": path}
        else:
            raise FileNotFoundError(f"--data {spec}: {p} does not exist. Give a parquet file or a folder in the hub layout.")
        return datasets.load_dataset("parquet", data_files=files)
    if kind == "imagefolder":
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--data {spec}: {path} is not a folder (expected DIR/<class>/<image>).")
        return datasets.load_dataset("imagefolder", data_dir=path)
    return datasets.load_dataset(spec)  # a hub name: needs internet


def _columns(ds, image_column: Optional[str], label_column: Optional[str]) -> tuple[str, str]:
    import datasets

    features = ds.features
    if image_column is None:
        image_column = next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    if label_column is None:
        label_column = next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
        label_column = label_column or next((k for k in ("label", "labels", "fine_label") if k in features), None)
    for role, col in (("image", image_column), ("label", label_column)):
        if col is None or col not in features:
            raise ValueError(
                f"No {role} column {'named ' + repr(col) + ' ' if col else ''}in the data; its columns are "
                f"{list(features)}. Name it with --{role}_column."
            )
    return image_column, label_column


def _stratified_subset(labels: torch.Tensor, seed: int, fraction=None, per_class=None) -> torch.Tensor:
    """Indices of a seeded, class-balanced subset: `per_class` images of each class, or `fraction` of each."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = per_class if per_class is not None else max(1, round(fraction * len(idx)))
        keep.append(idx[:n])
    return torch.cat(keep).sort().values


def _decode_all(ds, image_column: str, size: int, name: str) -> torch.Tensor:
    """Decode every image once into a uint8 (N, 3, size, size) tensor (resized if it is not already square at size)."""
    import datasets
    from PIL import Image

    resize = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    out = torch.empty(len(ds), 3, size, size, dtype=torch.uint8)
    raw = ds.cast_column(image_column, datasets.Image(decode=False))
    for i, item in enumerate(tqdm(raw, desc=f"decoding {name} once", unit="img", mininterval=2)):
        try:
            img = Image.open(_image_source(item[image_column])).convert("RGB")
        except Exception as e:
            where = item[image_column].get("path") or f"row {i}"
            raise ValueError(f"Could not decode the image at {where} of {name}: {e}. Remove or fix the file.") from e
        t = v2.functional.pil_to_tensor(img)
        out[i] = t if t.shape[-2:] == (size, size) else resize(t)
    return out


def _image_source(value: dict):
    import io

    return io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]


def _cached_images(ds, image_column: str, size: int, name: str, is_main: bool) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    path = CACHE_DIR / f"{ds._fingerprint}_{image_column}_{size}px.safetensors"
    if path.exists():
        return load_file(path)["images"]
    images = _decode_all(ds, image_column, size, name)
    if is_main:  # atomic write: a crash never leaves a half-written cache behind
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"images": images}, tmp)
        os.replace(tmp, path)
    return images


def load_splits(cfg, is_main: bool = True) -> Splits:
    """Train and validation splits from cfg.data (see TrainConfig). Validation is held out of train when the
    data has no validation split (seeded by cfg.split_seed, stratified by class)."""
    size = cfg.img_size
    if cfg.data.split(":")[0] == "synthetic":  # synthetic or synthetic:N (N images, 10% of them for validation)
        n = int(cfg.data.partition(":")[2] or 10_000)
        images, labels = synthetic_images(n, size, seed=1234)
        n_val = n // 10
        train_ds = TensorImages(images[n_val:], labels[n_val:], size)
        val_ds = TensorImages(images[:n_val], labels[:n_val], size)
        names, desc = list(SYNTHETIC_CLASSES), f"synthetic ({n - n_val:,} train / {n_val:,} val, built in)"
    else:
        dd = _load_hf(cfg.data)
        image_col, label_col = _columns(dd["train"], cfg.image_column, cfg.label_column)
        feature = dd["train"].features[label_col]
        names = list(getattr(feature, "names", None) or sorted(set(dd["train"][label_col])))
        if "validation" in dd:
            train_hf, val_hf, how = dd["train"], dd["validation"], "its validation split"
        else:
            stratify = label_col if hasattr(feature, "names") else None
            parts = dd["train"].train_test_split(test_size=cfg.val_fraction, seed=cfg.split_seed, stratify_by_column=stratify)
            train_hf, val_hf = parts["train"], parts["test"]
            how = f"{cfg.val_fraction:.0%} of train held out (seed {cfg.split_seed})"
        fits = len(dd["train"]) * 3 * size * size <= MAX_CACHE_BYTES
        make = TensorImages.from_hf if fits else HFImages
        train_ds = make(train_hf, image_col, label_col, size, name=f"{cfg.data} train", is_main=is_main)
        val_ds = make(val_hf, image_col, label_col, size, name=f"{cfg.data} val", is_main=is_main)
        desc = f"{cfg.data}: {len(train_ds):,} train / {len(val_ds):,} val ({how})"
    if cfg.label_fraction is not None or cfg.samples_per_class is not None:
        # The subset varies with the run's seed; the validation split (split_seed) never does.
        keep = _stratified_subset(train_ds.labels, getattr(cfg, "seed", 0), cfg.label_fraction, cfg.samples_per_class)
        train_ds = train_ds.subset(keep)
        desc += f"; training on a class-balanced subset of {len(train_ds):,}"
    train_ds.augment = augmentation(size, cfg.crop_scale, cfg.hflip)
    return Splits(train_ds, val_ds, len(names), names, desc)


# --------------------------------------------------------------------------------------------------------------
# Datasets and augmentation


def augmentation(size: int, crop_scale=(0.35, 1.0), hflip: bool = True) -> v2.Compose:
    """The ViT paper's training augmentation: random resized crop and horizontal flip (on uint8 tensors)."""
    steps = [v2.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


class ImageDataset(Dataset):
    """Yields {"image": uint8 (3, S, S), "label": int}. Augmentation of item i in epoch e draws from an RNG
    seeded by (seed, e, i), so the data a step sees is a function of the step alone: resuming mid-epoch
    reproduces it exactly, whatever the loader prefetched before the interruption."""

    augment: Optional[v2.Compose] = None
    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _augmented(self, image: torch.Tensor, index: int) -> torch.Tensor:
        if self.augment is None:
            return image
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF)
            return self.augment(image)


class TensorImages(ImageDataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int):
        self.images, self.labels, self.size = images, labels, size

    @classmethod
    def from_hf(cls, ds, image_column, label_column, size, name, is_main=True):
        labels = torch.as_tensor(ds[label_column], dtype=torch.long)
        return cls(_cached_images(ds, image_column, size, name, is_main), labels, size)

    def subset(self, indices: torch.Tensor) -> "TensorImages":
        return TensorImages(self.images[indices], self.labels[indices], self.size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self._augmented(self.images[index], index), "label": self.labels[index]}


class HFImages(ImageDataset):
    """Decodes per sample, for datasets too large to cache at the training resolution."""

    def __init__(self, ds, image_column, label_column, size, name="", is_main=True):
        self.ds, self.image_column, self.size = ds, image_column, size
        self.labels = torch.as_tensor(ds[label_column], dtype=torch.long)
        self.resize = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def subset(self, indices: torch.Tensor) -> "HFImages":
        sub = HFImages.__new__(HFImages)
        sub.__dict__.update(self.__dict__, ds=self.ds.select(indices.tolist()), labels=self.labels[indices])
        return sub

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        image = v2.functional.pil_to_tensor(self.ds[index][self.image_column].convert("RGB"))
        image = self._augmented(image, index) if self.augment is not None else self.resize(image)
        return {"image": image, "label": self.labels[index]}


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch (the dataset's epoch), so the order of every epoch is known on resume.
    Yields num_samples indices (a whole number of global batches, so processes and accumulation split evenly)."""

    def __init__(self, dataset: ImageDataset, seed: int, num_samples: Optional[int] = None, shuffle: bool = True):
        self.dataset, self.seed, self.shuffle = dataset, seed, shuffle
        self.num_samples = len(dataset) if num_samples is None else num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.dataset.epoch)
        return iter(torch.randperm(len(self.dataset), generator=g)[: self.num_samples].tolist())
