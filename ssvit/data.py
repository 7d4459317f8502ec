"""Data on Hugging Face datasets: synthetic | parquet:PATH | imagefolder:DIR | hub names.

Images reach the model as uint8 (3, S, S) tensors; the loop turns them into [0, 1] floats on the device.
Datasets that fit in memory at the training resolution (CIFAR, the synthetic set) are decoded once into a
uint8 tensor cache, kept on disk under ``~/.cache/ssvit`` keyed by the dataset's fingerprint, so that on
2 CPU cores the input pipeline is never what the model waits for. Larger ones decode per sample.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import Dataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from ssvit.errors import UsageError

CACHE_DIR = Path(os.environ.get("SSVIT_CACHE", Path.home() / ".cache" / "ssvit"))
# Data up to this size at the training resolution is decoded once into the uint8 cache; larger data per image.
MAX_CACHE_BYTES = 4 * 2**30


def max_cache_bytes() -> int:
    return int(os.environ.get("SSVIT_MAX_CACHE_BYTES", MAX_CACHE_BYTES))


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
    """0 for unlabeled data (self-supervised objectives train on it; labels are then -1)."""
    class_names: list[str]
    description: str
    test: Optional["ImageDataset"] = None
    """Held out for the numbers a study reports: the data's own test split, or --test_fraction of train."""
    unlabeled: Optional["ImageDataset"] = None
    """Every training image, labels unused, for an objective that draws a second stream (Objective.unlabeled)."""


@dataclass(frozen=True)
class DataSource:
    """--data, parsed in this one place: synthetic[:N], parquet:PATH (a file, a glob or a folder in the hub layout),
    imagefolder:DIR, or a Hugging Face hub dataset name (kind "hub")."""

    kind: str
    location: str
    """N for synthetic ("" for the default size), the path, or the hub name."""

    @classmethod
    def parse(cls, spec: str) -> "DataSource":
        kind, colon, location = spec.partition(":")
        if kind in ("parquet", "imagefolder"):
            if not location:
                raise UsageError(f"--data {spec}: {kind} needs a path, e.g. --data {kind}:/data/{'shards' if kind == 'parquet' else 'images'}.")
            return cls(kind, location)
        if kind == "synthetic":
            if location and not (location.isdigit() and int(location) > 0):
                raise UsageError(f"--data {spec}: synthetic takes a number of images, e.g. --data synthetic:2000.")
            return cls(kind, location)
        if not spec:
            raise UsageError("--data is empty: give synthetic, parquet:PATH, imagefolder:DIR or a hub dataset name.")
        return cls("hub", spec)

    @property
    def is_local(self) -> bool:
        return self.kind in ("parquet", "imagefolder")


SPLIT_PREFIXES = {"train": ("train",), "validation": ("validation", "valid", "val"), "test": ("test",)}


def _split_files(folder: Path, suffix: str) -> dict[str, list[str]]:
    """Files of each split in the hub layout (train-00000-of-00002.parquet, validation*.parquet, test*...), at the
    top of the folder only: a copy kept in a subfolder (a backup/, an older prepare) is never taken in."""
    files = {}
    for split, prefixes in SPLIT_PREFIXES.items():
        found = {str(f) for prefix in prefixes for f in folder.glob(f"{prefix}*{suffix}") if f.is_file()}
        found -= {f for other in files.values() for f in other}  # "val*" also matches validation files
        if found:
            files[split] = sorted(found)
    return files


def parquet_files(spec: str) -> dict[str, list[str]]:
    """The parquet files of --data parquet:PATH by split: a file or a glob (all train), or a folder in the hub layout
    (train-*.parquet, validation-*, test-* at its top or in its data/ folder; parquet files there not named by split
    are all train). Never a recursive search. Used by map-style and streamed data alike."""
    from glob import glob

    path = DataSource.parse(spec).location
    p = Path(path)
    if any(ch in path for ch in "*?["):
        return {"train": sorted(glob(path))}
    if p.is_file():
        return {"train": [path]}
    if not p.is_dir():
        raise FileNotFoundError(f"--data {spec}: {p} does not exist. Give a parquet file or a folder in the hub layout.")
    for folder in (p, p / "data"):
        files = _split_files(folder, ".parquet") if folder.is_dir() else {}
        unnamed = sorted(str(f) for f in folder.glob("*.parquet") if f.is_file()) if folder.is_dir() else []
        files = files or ({"train": unnamed} if unnamed else {})  # parquet files not named by split: all train
        if files:
            break
    if not files.get("train"):
        raise FileNotFoundError(f"--data {spec}: no train*.parquet file at the top of {p} or in {p / 'data'} (hub layout "
                                f"expected: train-*.parquet, optionally validation-*.parquet and test-*.parquet).")  # fmt: skip
    return files


def load_source(spec: str):
    """A DatasetDict from --data (not synthetic). Local paths are checked first so a typo is an error, not a download."""
    import datasets

    source = DataSource.parse(spec)
    kind, path = source.kind, source.location
    p = Path(path)
    if kind == "parquet":
        return datasets.load_dataset("parquet", data_files=parquet_files(spec))
    if kind == "imagefolder":
        if not p.is_dir():
            raise FileNotFoundError(f"--data {spec}: {path} is not a folder (expected DIR/<class>/<image>, or images in DIR).")
        from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

        # datasets would end in "Instruction train corresponds to no data" after its own file scan.
        if not any(f.suffix.lower() in ImageFolder.EXTENSIONS for f in p.rglob("*") if f.is_file()):
            raise UsageError(f"--data {spec}: no image files in it (expected DIR/<class>/<image>, or images in DIR, in a "
                             f"format datasets' imagefolder reads: .jpg, .png, .webp, ...).")  # fmt: skip
        # Splits by folder (DIR/train/<class>/..., DIR/val/...) when DIR has them; otherwise everything is train.
        # (datasets' own inference would take a file named like n02917067_bullet_train.JPEG for a split.)
        subdirs = {d.name: d for d in p.iterdir() if d.is_dir()}
        by_folder = {split: f"{subdirs[n]}/**" for split, names in SPLIT_PREFIXES.items() for n in names if n in subdirs}
        return datasets.load_dataset("imagefolder", data_files=by_folder if "train" in by_folder else {"train": f"{p}/**"})
    return _load_hub(spec)


def _load_hub(name: str):
    import socket
    from urllib.parse import urlparse

    import datasets
    import huggingface_hub

    try:
        if not huggingface_hub.constants.HF_HUB_OFFLINE:  # no name service: say so now, not after 30 s of retries
            socket.getaddrinfo(urlparse(huggingface_hub.constants.ENDPOINT).hostname, 443)
        return datasets.load_dataset(name)
    except (ConnectionError, OSError, huggingface_hub.errors.HfHubHTTPError) as e:
        if Path(name).exists():
            raise UsageError(f"--data {name}: a local path needs its kind, e.g. --data imagefolder:{name} or parquet:{name}.") from e
        raise ConnectionError(
            f"--data {name}: the Hugging Face hub cannot be reached (or has no such dataset): {type(e).__name__}. Without "
            f"network, download it elsewhere and give the files: --data parquet:DIR (hub layout) or imagefolder:DIR."
        ) from e


def columns(ds, image_column: Optional[str], label_column: Optional[str]) -> tuple[str, Optional[str]]:
    """The image column and the label column (None when the data has no labels and none was named)."""
    import datasets

    features = ds.features
    named_label = label_column is not None
    if image_column is None:
        image_column = next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    if label_column is None:
        label_column = next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
        label_column = label_column or next((k for k in ("label", "labels", "fine_label") if k in features), None)
    for role, col in (("image", image_column), ("label", label_column if named_label else "")):
        if col is None or (col and col not in features):
            raise UsageError(
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
            img = to_rgb(Image.open(_image_source(item[image_column])))
        except Exception as e:
            where = item[image_column].get("path") or f"row {i}"
            raise UsageError(f"Could not decode the image at {where} of {name}: {e}. Remove or fix the file.") from e
        t = v2.functional.pil_to_tensor(img)
        out[i] = t if t.shape[-2:] == (size, size) else resize(t)
    return out


def to_rgb(img):
    """A PIL image in 8-bit RGB. PIL's convert("RGB") clips 16-bit and 32-bit greyscale (modes I;16, I, as 16-bit
    PNG and TIFF open) to 255, i.e. white: their values are scaled to 8 bits first (16-bit data in mode I, as
    older Pillow reads 16-bit PNG, when every value fits in 16 bits), and float images (mode F) from [0, 1]."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img).astype(np.int64)
        bits = 16 if img.mode.startswith("I;16") or (a.min() >= 0 and a.max() < 2**16) else 32
        shifted = (a >> (bits - 8)) if bits == 16 else ((a - a.min()) * 255 // max(int(a.max() - a.min()), 1))
        img = Image.fromarray(shifted.clip(0, 255).astype(np.uint8))
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((a * (255 if a.max() <= 1 else 1)).round().clip(0, 255).astype(np.uint8))
    return img.convert("RGB")


def _image_source(value: dict):
    import io

    return io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]


def data_key(ds) -> Optional[str]:
    """What identifies a loaded data set across runs, from datasets' public API: it writes what it loads to Arrow
    files (Dataset.cache_files) whose folder names hash the source, every data file's path and modification time
    or the hub revision included. None for a data set held in memory only."""
    import hashlib

    files = [f["filename"] for f in ds.cache_files]
    return hashlib.sha256(json.dumps([files, len(ds), str(ds.features)]).encode()).hexdigest()[:16] if files else None


def _cached_images(ds, image_column: str, size: int, name: str, is_main: bool) -> torch.Tensor:
    """Every image of ds decoded once at `size`, kept under CACHE_DIR for the next run on the same data."""
    from safetensors.torch import load_file, save_file

    key = data_key(ds)
    path = CACHE_DIR / f"{key}_{image_column}_{size}px.safetensors"
    if key and path.exists():
        return load_file(path)["images"]
    images = _decode_all(ds, image_column, size, name)
    if key and is_main:  # atomic write: a crash never leaves a half-written cache behind
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"images": images}, tmp)
        os.replace(tmp, path)
    return images


def column(ds, name: Optional[str]) -> torch.Tensor:
    """A whole integer column as an int64 tensor, read as one Arrow slice (ds[name] is read row by row in
    datasets 5: 10 s for 50,000 labels)."""
    if name is None:  # unlabeled data: every label is -1
        return torch.full((len(ds),), -1, dtype=torch.long)
    return torch.from_numpy(ds.select_columns([name]).with_format("arrow")[:][name].to_numpy().astype("int64"))


def hold_out(labels: Optional[np.ndarray], size: float | int, seed: int, what: str = "--val_fraction", n: Optional[int] = None):
    """The one held-out split of ssvit, for map-style and streamed data alike (so the same --split_seed holds out
    the same images in both): hold `size` images (an int) or a fraction of them out, seeded, stratified by `labels`
    when given and every class has at least two images, with at least one image of each class held out. This is
    datasets' Dataset.train_test_split, computed on the label column alone (its stratified algorithm, from
    datasets.utils.stratify; its shuffled permutation otherwise), so that a stream needs no Dataset to split.
    Returns (rest, held out, how): positions in 0..n-1 (n: len(labels))."""
    from datasets.utils.stratify import stratified_shuffle_split_generate_indices

    n = len(labels) if n is None else n
    n_out = size if isinstance(size, int) else math.ceil(size * n)  # as datasets counts a fraction
    how = f"{n_out:,} held out of train (seed {seed})"
    if labels is not None:
        counts = np.unique(labels, return_counts=True)[1]
        if counts.min() < 2:
            labels, how = None, how + ", not stratified: some class has a single image"
        elif n_out < len(counts):  # a stratified split holds out at least one image of each class
            n_out = len(counts)
            how = f"{n_out} held out of train, one per class (seed {seed})"
    if not 0 < n_out < n:
        raise UsageError(f"{what} {size}: cannot hold {n_out} of {n} images out; give a value between 0 and 1 "
                         f"that leaves images on both sides.")  # fmt: skip
    rng = np.random.default_rng(seed)
    if labels is None:
        order = rng.permutation(n)
        return order[n_out:], order[:n_out], how
    rest, held = next(stratified_shuffle_split_generate_indices(np.asarray(labels), n - n_out, n_out, rng=rng))
    return rest, held, how


def held_out_splits(labels: Optional[np.ndarray], n: int, cfg, has: set) -> tuple[dict, np.ndarray, list[str]]:
    """{"validation": rows, "test": rows} held out of n training rows for the splits the data lacks (`has`: the data's
    own), and the rows left to train on: validation first (--val_fraction), then test (--test_fraction of all of
    train) out of the rest, so that validation is the same images with or without a test split."""
    rows, held, how = np.arange(n), {}, []
    if "validation" not in has:
        rest, val, note = hold_out(labels, cfg.val_fraction, cfg.split_seed, n=n)
        rows, held["validation"], how = rows[rest], rows[val], [note]
    test_fraction = cfg.test_fraction
    if "test" not in has and test_fraction:
        sub = None if labels is None else labels[rows]
        rest, test, note = hold_out(sub, round(test_fraction * n), cfg.split_seed, "--test_fraction", n=len(rows))
        rows, held["test"] = rows[rest], rows[test]
        how.append(f"test: {note}")
    return held, rows, how


def _synthetic_splits(cfg) -> Splits:
    """synthetic or synthetic:N: N images, the first 10% for validation, then --test_fraction for test."""
    n, size = int(DataSource.parse(cfg.data).location or 10_000), cfg.img_size
    images, labels = synthetic_images(n, size, seed=1234)
    n_val = n // 10
    n_test = round((cfg.test_fraction or 0) * n)
    part = lambda a, b: TensorImages(images[a:b], labels[a:b], size)  # noqa: E731
    test = part(n_val, n_val + n_test) if n_test else None
    desc = f"synthetic ({n - n_val - n_test:,} train / {n_val:,} val{f' / {n_test:,} test' if n_test else ''}, built in)"
    return Splits(part(n_val + n_test, n), part(0, n_val), len(SYNTHETIC_CLASSES), list(SYNTHETIC_CLASSES), desc, test)


def _hf_splits(cfg, is_main: bool) -> Splits:
    dd = load_source(cfg.data)
    base = dd["train"]
    image_col, label_col = columns(base, cfg.image_column, cfg.label_column)
    feature = base.features.get(label_col)
    labels = column(base, label_col)
    names = [str(n) for n in getattr(feature, "names", None) or (labels.unique().tolist() if label_col else [])]
    stratify = labels.numpy() if hasattr(feature, "names") else None  # stratified by a ClassLabel column
    held, train_rows, notes = held_out_splits(stratify, len(base), cfg, set(dd))
    how = "its validation split" if "validation" in dd else notes.pop(0)
    if "test" in dd:
        notes.append("test: its test split")
    cached = len(base) * 3 * cfg.img_size**2 <= max_cache_bytes()
    # Each split is rows of train (held out) or the data's own split; train's images are decoded (or read from the
    # cache) once, and every split held out of it is a slice of them.
    parts = {"train": (base, train_rows),
             "val": (dd["validation"], None) if "validation" in dd else (base, held["validation"]),
             "test": (dd["test"], None) if "test" in dd else (base, held.get("test"))}  # fmt: skip
    whole = TensorImages(_cached_images(base, image_col, cfg.img_size, f"{cfg.data} train", is_main), labels, cfg.img_size) if cached else None
    built = {}
    for k, (ds, rows) in parts.items():
        if ds is base and rows is None:  # no test split
            continue
        if not cached:
            built[k] = HFImages(ds, image_col, label_col, cfg.img_size, rows=rows)
        else:
            built[k] = whole.subset(torch.as_tensor(rows)) if ds is base else TensorImages.from_hf(ds, image_col, label_col, cfg.img_size, f"{cfg.data} {k}", is_main)
    desc = f"{cfg.data}: {len(built['train']):,} train / {len(built['val']):,} val ({how}{'; ' if notes else ''}{'; '.join(notes)})"
    if label_col is None:
        desc += "; no labels"
    if not cached:
        desc += f"; decoded per image (over the {max_cache_bytes() / 2**30:.3g} GiB uint8 cache: SSVIT_MAX_CACHE_BYTES)"
    return Splits(built["train"], built["val"], len(names), names, desc, built.get("test"))


def load_splits(cfg, is_main: bool = True, views: Optional["Views"] = None, unlabeled_views: Optional["Views"] = None) -> Splits:
    """Train, validation and (when there is one) test splits from cfg.data (see TrainConfig). Validation is
    held out of train when the data has no validation split (seeded by cfg.split_seed, stratified by class).
    Training items are the paper's crop and flip, or the objective's `views` (a list of crops per item). With
    `unlabeled_views`, splits.unlabeled holds every training image (before --label_fraction) as those views."""
    splits = _synthetic_splits(cfg) if DataSource.parse(cfg.data).kind == "synthetic" else _hf_splits(cfg, is_main)
    train = splits.train
    if unlabeled_views is not None:  # its own seed: the two streams' crops are drawn independently
        splits.unlabeled = train.augmented(unlabeled_views, cfg.seed + 1)
    if cfg.label_fraction is not None or cfg.samples_per_class is not None:
        if not splits.num_classes:
            raise UsageError("--label_fraction / --samples_per_class draw a class-balanced subset: the data has no labels.")
        # The subset varies with the run's seed; the validation split (split_seed) never does.
        train = train.subset(_stratified_subset(train.labels, cfg.seed, cfg.label_fraction, cfg.samples_per_class))
        splits.description += f"; training on a class-balanced subset of {len(train):,}"
    augment = views or augmentation(cfg.img_size, cfg.crop_scale, cfg.hflip)
    splits.train = train.augmented(augment, cfg.seed)
    return splits


# --------------------------------------------------------------------------------------------------------------
# Datasets and augmentation


@dataclass(frozen=True)
class Augmentation:
    """The ViT paper's training augmentation: a random resized crop and a horizontal flip, drawn as torchvision's
    RandomResizedCrop and RandomHorizontalFlip draw them, so that a crop box can be drawn before anything is
    decoded: the fast JPEG path decodes only what the box needs (HFImages)."""

    size: int
    scale: tuple = (0.35, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    hflip: bool = True
    interpolation: str = "bilinear"
    """Of the resize, as torchvision names it (bilinear, bicubic), antialiased."""

    def draw(self, height: int, width: int, rng: Optional[random.Random] = None) -> tuple[int, int, int, int, bool]:
        """(top, left, height, width, flip) of the crop, by torchvision's RandomResizedCrop.get_params and
        RandomHorizontalFlip, op for op. With rng=None the numbers come from torch's global RNG and are
        torchvision's own (tested equal); ssvit's loaders pass an item's own random.Random (item_rng): seeding and
        drawing take about 20 us where a torch.Generator's take 70 (the boxes are identically distributed: tested)."""
        if rng is None:
            uniform, randrange = lambda a, b: torch.empty(1).uniform_(a, b).item(), lambda n: int(torch.randint(0, n, (1,)))
            coin = lambda: torch.rand(1).item()  # noqa: E731
        else:
            uniform, randrange, coin = rng.uniform, rng.randrange, rng.random
        area, (lo, hi) = height * width, (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * uniform(self.scale[0], self.scale[1])
            aspect = math.exp(uniform(lo, hi))
            w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i, j = randrange(height - h + 1), randrange(width - w + 1)
                break
        else:  # torchvision's fallback: the central crop at the nearest allowed aspect ratio
            w, h = width, height
            if width / height < min(self.ratio):
                h = int(round(w / min(self.ratio)))
            elif width / height > max(self.ratio):
                w = int(round(h * max(self.ratio)))
            i, j = (height - h) // 2, (width - w) // 2
        return i, j, h, w, self.hflip and coin() < 0.5

    def decode(self, data: bytes, rng: random.Random) -> torch.Tensor:
        """The crop from encoded bytes: its box is drawn from the image's header, and only what it needs is decoded
        (decode_crop; the box's pixels are the full decode's: tested), resized with this interpolation."""
        return decode_crop(data, lambda h, w: self.draw(h, w, rng), self.size, self.interpolation)

    def __call__(self, image: torch.Tensor, rng: Optional[random.Random] = None) -> torch.Tensor:
        i, j, h, w, flip = self.draw(*image.shape[-2:], rng)
        out = v2.functional.resized_crop(image, i, j, h, w, [self.size, self.size], v2.InterpolationMode(self.interpolation), antialias=True)
        return out.flip(-1) if flip else out


def augmentation(size: int, crop_scale=(0.35, 1.0), hflip: bool = True) -> Augmentation:
    return Augmentation(size, tuple(crop_scale), hflip=hflip)


@dataclass(frozen=True)
class Photometric:
    """The photometric part of a multi-crop view (DINO's DataAugmentationDINO, Caron et al., 2021, main_dino.py,
    after BYOL): colour jitter (brightness, contrast, saturation, hue, in a random order) with probability
    jitter_prob, grayscale, Gaussian blur with sigma uniform in blur_sigma, solarisation, each drawn as torchvision's
    ColorJitter, RandomGrayscale, GaussianBlur and RandomSolarize draw them, but from the item's own RNG, on uint8.
    Drawing (`draw`, per item) is apart from applying (`photometric`, per batch: Crops, collate)."""

    jitter: tuple = (0.4, 0.4, 0.2, 0.1)
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    solarize_prob: float = 0.0

    def draw(self, rng: random.Random) -> PhotometricDraw:
        """One crop's parameters, drawn in the order torchvision's transforms draw them."""
        jitter = None
        if rng.random() < self.jitter_prob:
            b, c, s, h = self.jitter
            factors = (rng.uniform(max(0, 1 - b), 1 + b), rng.uniform(max(0, 1 - c), 1 + c), rng.uniform(max(0, 1 - s), 1 + s),
                       rng.uniform(-h, h))  # fmt: skip
            jitter = (factors, tuple(rng.sample(range(4), 4)))  # ColorJitter applies the four in a random order
        grayscale = rng.random() < self.grayscale_prob
        sigma = rng.uniform(*self.blur_sigma) if rng.random() < self.blur_prob else None
        return PhotometricDraw(jitter, grayscale, sigma, rng.random() < self.solarize_prob)

    def __call__(self, image: torch.Tensor, rng: random.Random) -> torch.Tensor:
        return photometric(image[None], [self.draw(rng)])[0]


class PhotometricDraw(NamedTuple):
    jitter: Optional[tuple]  # (brightness, contrast, saturation, hue factors), the order of the four ops
    grayscale: bool
    sigma: Optional[float]  # of the blur, None for no blur
    solarize: bool


def photometric(images: torch.Tensor, draws: list[PhotometricDraw]) -> torch.Tensor:
    """uint8 crops (N, 3, H, W), one draw each, transformed as torchvision.transforms.v2.functional would one by one
    (tested equal, bit for bit): the same float32 operations, with a factor per crop instead of one per call."""
    # the helpers of adjust_hue and gaussian_blur, which take one factor per call: the tests pin the result to those
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv
    from torchvision.transforms.v2.functional._misc import _get_gaussian_kernel2d

    f, images = v2.functional, images.clone()

    def factor(values, shape=(-1, 1, 1, 1)):  # float32 as the kernels cast a Python float
        return torch.tensor(values, dtype=torch.float32).view(shape)

    def blend(image, other, ratio):  # torchvision's _blend: image * r + other * (1 - r), with 1 - r in double
        out = torch.addcmul(image.mul(factor(ratio)), other, factor([1.0 - r for r in ratio]))
        return out.clamp_(0, 255).to(torch.uint8)

    def hue(x, shift):  # adjust_hue: through HSV in float32
        h, s, v = _rgb_to_hsv(f.to_dtype(x, torch.float32, scale=True)).unbind(-3)
        h.add_(factor(shift, (-1, 1, 1))).remainder_(1.0)
        return f.to_dtype(_hsv_to_rgb(torch.stack((h, s, v), -3)), torch.uint8, scale=True)

    ops = (lambda x, r: x.mul(factor(r)).clamp_(0, 255).to(torch.uint8),  # brightness
           lambda x, r: blend(x, f.rgb_to_grayscale(x).float().mean((-3, -2, -1), keepdim=True), r),  # contrast
           lambda x, r: blend(x, f.rgb_to_grayscale(x).float(), r),  # saturation
           hue)  # fmt: skip
    for position in range(4):
        for op in range(4):
            chosen = [n for n, d in enumerate(draws) if d.jitter and d.jitter[1][position] == op]
            if chosen:
                images[chosen] = ops[op](images[chosen], [draws[n].jitter[0][op] for n in chosen])
    gray = [n for n, d in enumerate(draws) if d.grayscale]
    if gray:
        images[gray] = f.rgb_to_grayscale(images[gray], num_output_channels=3)
    side = min(images.shape[-2:])
    sizes = {n: min(2 * math.ceil(3 * d.sigma) + 1, 2 * ((side - 1) // 2) + 1) for n, d in enumerate(draws) if d.sigma is not None}
    for k in set(sizes.values()):  # gaussian_blur's kernel for each crop's sigma, the crops of one size in one conv
        blurred = [n for n, size in sizes.items() if size == k]
        kernels = torch.cat([_get_gaussian_kernel2d([k, k], [draws[n].sigma] * 2, torch.float32, images.device).expand(3, 1, k, k) for n in blurred])
        x = torch.nn.functional.pad(rearrange(images[blurred].float(), "n c h w -> 1 (n c) h w"), [k // 2] * 4, mode="reflect")
        x = torch.nn.functional.conv2d(x, kernels, groups=len(kernels)).round_().to(torch.uint8)
        images[blurred] = rearrange(x, "1 (n c) h w -> n c h w", c=3)
    solar = [n for n, d in enumerate(draws) if d.solarize]
    if solar:
        images[solar] = f.solarize(images[solar], 128)
    return images


@dataclass(frozen=True)
class RandAugment:
    """FixMatch's strong augmentation (Sohn et al., 2020, section 2.3, App. D): RandAugment, `num_ops` operations of
    torchvision's RandAugment at a magnitude drawn per image from 1 to `max_magnitude` (FixMatch draws it at random
    instead of fixing it), then Cutout: a square of up to `cutout` of the image side filled with grey (127). Drawn
    from the item's RNG, on uint8 (torchvision's RandAugment draws from torch's RNG: it runs in a forked RNG seeded
    from the item's, so that exact resume holds and the training process's own stream is untouched)."""

    num_ops: int = 2
    max_magnitude: int = 10
    cutout: float = 0.5

    def __call__(self, image: torch.Tensor, rng: random.Random) -> torch.Tensor:
        if self.num_ops:
            magnitude = rng.randint(1, self.max_magnitude)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rng.getrandbits(63))
                image = v2.RandAugment(self.num_ops, magnitude, num_magnitude_bins=self.max_magnitude + 1)(image)
        if self.cutout:
            height, width = image.shape[-2:]
            side = round(rng.uniform(0, self.cutout) * min(height, width))
            y, x = rng.randrange(height), rng.randrange(width)  # the square's centre, clipped at the borders
            image = image.clone()
            image[..., max(0, y - side // 2) : y + (side + 1) // 2, max(0, x - side // 2) : x + (side + 1) // 2] = 127
        return image


@dataclass(frozen=True)
class View:
    """One crop of a multi-crop objective: a random resized crop at `size` from `scale` of the area, a flip, then
    its photometric augmentation."""

    size: int
    scale: tuple
    photometric: Optional[Photometric | RandAugment] = None
    hflip: bool = True
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class Views:
    """The views an objective trains on (Objective.views): each item becomes a list of uint8 crops, one per view,
    all drawn from the item's own RNG (seed, epoch, index), so exact resume holds as for one crop. Evaluation sees one
    view, the image as stored."""

    views: tuple

    def __call__(self, image: torch.Tensor, rng: Optional[random.Random] = None) -> Crops:
        rng = rng or random.Random(int(torch.randint(0, 2**62, (1,))))
        crops, pending = [], []
        for view in self.views:
            crop = Augmentation(view.size, tuple(view.scale), hflip=view.hflip, interpolation=view.interpolation)(image, rng)
            batched = isinstance(view.photometric, Photometric)  # drawn now, in turn; applied to the batch by collate
            pending.append(view.photometric.draw(rng) if batched else None)
            crops.append(view.photometric(crop, rng) if view.photometric and not batched else crop)
        return Crops(crops, pending)

    def decode(self, data: bytes, rng: random.Random) -> Crops:
        """The crops from encoded bytes: several boxes of the whole image, which is decoded once."""
        return self(pil_decode(data).permute(2, 0, 1), rng)

    def example(self, batch: int) -> list[torch.Tensor]:
        """Random float images in [0, 1] shaped as a batch of these views (FLOPs counting, benchmarks)."""
        return [torch.rand(batch, 3, v.size, v.size) for v in self.views]


class Crops(list):
    """An item's views: uint8 crops, one per view, with their photometric augmentations drawn (`pending`: a
    PhotometricDraw or None per crop) but applied by `collate` to the whole batch, one call per view, in the loader's
    worker: on 12-32 px crops each op costs its call, not its pixels (docs/performance.md). `finished()` applies them
    to this item alone: the same pixels (tested)."""

    def __init__(self, crops: list[torch.Tensor], pending: list[Optional[PhotometricDraw]]):
        super().__init__(crops)
        self.pending = pending

    def finished(self) -> list[torch.Tensor]:
        return [crop if draw is None else photometric(crop[None], [draw])[0] for crop, draw in zip(self, self.pending)]


def item_rng(seed: int, epoch: int, index: int) -> random.Random:
    """An RNG seeded by (seed, epoch, index): an item's augmentation depends on nothing else."""
    return random.Random(hash((seed, epoch, index)))


# libjpeg's DCT scaling decodes at n/8 scale; only 1/2, 1/4 and 1/8 pay here: 7/8 to 5/8 took 13-45% longer than
# a full decode and 3/8 longer than 1/2 (no SIMD for their inverse DCTs; 200 of the shared photographs).
DCT_SCALES = (1 / 8, 1 / 4, 1 / 2)


def decode_crop(data: bytes, draw: Callable[[int, int], tuple], size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Decode only what a crop box needs, straight to uint8 (3, size, size). The box is drawn by `draw` from the
    image's size, read from its JPEG header (2 us; PIL's takes 33). libjpeg-turbo (simplejpeg) then decodes the
    JPEG at the smallest of DCT_SCALES that keeps the box at least `size` pixels across or, at full size, only the
    rows of MCUs the box needs when the JPEG has restart markers (ssvit.jpeg: the same pixels); the box is cropped
    as a view and resized in one antialiased uint8 resampling (channels-last: PyTorch's vectorised path). What
    libjpeg-turbo cannot decode to RGB (PNG, CMYK, a JPEG with a recoverable error) PIL decodes whole."""
    import simplejpeg

    from ssvit import jpeg

    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        full = None if colorspace not in ("CMYK", "YCCK") else pil_decode(data)
    except ValueError:  # not a JPEG
        full = pil_decode(data)
    if full is not None:
        i, j, h, w, flip = draw(*full.shape[:2])
    else:
        i, j, h, w, flip = draw(height, width)
        scale = next((s for s in DCT_SCALES if min(h, w) * s >= size), 1)
        lay = jpeg.layout(data) if scale == 1 else None  # bands are bit-exact at full scale (tested), not at 1/4
        if lay is not None:
            data, top, height = jpeg.band(data, lay, i, i + h)
            i -= top
        try:
            full = torch.from_numpy(simplejpeg.decode_jpeg(data, "RGB", min_height=math.ceil(height * scale), min_width=math.ceil(width * scale)))
        except ValueError:  # libjpeg-turbo refuses what PIL tolerates (extraneous bytes before a marker...)
            full = pil_decode(data)
        if full.shape[:2] != (height, width):  # decoded at a reduced scale: the box in its pixels
            sy, sx = full.shape[0] / height, full.shape[1] / width
            i, j, h, w = round(i * sy), round(j * sx), max(1, round(h * sy)), max(1, round(w * sx))
    box = full[i : i + h, j : j + w].permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
    out = torch.nn.functional.interpolate(box, size=(size, size), mode=interpolation, antialias=True, align_corners=False)[0]
    return out.flip(-1) if flip else out


def decode_item(data: bytes, augment: Optional[Augmentation | Views], rng: random.Random, size: int):
    """An item from its encoded bytes, the one decode path of per-image and streamed data: the augmentation decodes
    what it needs (Augmentation.decode, Views.decode); without one (evaluation), the image as stored, resized and
    centre-cropped to `size`."""
    if augment is not None:
        return augment.decode(data, rng)
    return as_stored(pil_decode(data).permute(2, 0, 1), size)


def as_stored(image: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation's view of an image: its shorter side resized to `size`, the centre cropped (unchanged at that size)."""
    if image.shape[-2:] == (size, size):
        return image
    return v2.functional.center_crop(v2.functional.resize(image, size, antialias=True), size)


def unreadable(where: str, error: Exception) -> UsageError:
    """The one line an image that cannot be decoded gets, from the training process or a loader worker."""
    return UsageError(f"Could not decode the image at {where}: {error}. Remove or fix it (ssvit.prepare refuses "
                      f"unreadable images and writes clean shards).")  # fmt: skip


def pil_decode(data: bytes) -> torch.Tensor:
    """uint8 (H, W, 3) by PIL: any format, any mode."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return torch.from_numpy(np.array(to_rgb(img)))


class ImageDataset(Dataset):
    """Yields {"image": uint8 (3, S, S), "label": int}; augmentation and its seed are fixed at construction.

    Items are addressed by an index, or by (epoch, index) as EpochSampler yields them: the augmentation of item
    i in epoch e draws from an RNG seeded by (seed, e, i), so the data a step sees is a function of the step
    alone. Resuming mid-epoch reproduces it exactly, whatever the loader prefetched before the interruption,
    and worker processes need no shared epoch counter."""

    def __init__(self, labels: torch.Tensor, size: int, augment: Optional[Augmentation] = None, seed: int = 0):
        self.labels, self.size, self.augment, self.seed = labels, size, augment, seed

    def __len__(self) -> int:
        return len(self.labels)

    def augmented(self, augment: Optional[Augmentation], seed: int = 0) -> "ImageDataset":
        """The same images with another augmentation (None: as stored, for evaluation)."""
        copy = self.__class__.__new__(self.__class__)
        copy.__dict__.update(self.__dict__, augment=augment, seed=seed)
        return copy

    def _image(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image = self._image(index)
        if self.augment is not None:
            image = self.augment(image, item_rng(self.seed, epoch, index))
        else:
            image = as_stored(image, self.size)
        return {"image": image, "label": self.labels[index]}


class TensorImages(ImageDataset):
    """Images decoded once into a uint8 tensor (N, 3, S, S)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int, augment=None, seed: int = 0):
        super().__init__(labels, size, augment, seed)
        self.images = images

    @classmethod
    def from_hf(cls, ds, image_column, label_column, size, name, is_main=True):
        return cls(_cached_images(ds, image_column, size, name, is_main), column(ds, label_column), size)

    def subset(self, indices: torch.Tensor) -> "TensorImages":
        return TensorImages(self.images[indices], self.labels[indices], self.size, self.augment, self.seed)

    def _image(self, index: int) -> torch.Tensor:
        return self.images[index]


class HFImages(ImageDataset):
    """Decodes per sample, for datasets too large to cache at the training resolution. With augmentation, the
    crop box is drawn from the image's header first and only what it needs is decoded (decode_crop); the
    boxes are the same as the full-decode path's (fast_decode=False), drawn from the same RNG."""

    def __init__(self, ds, image_column, label_column, size, name="", is_main=True, augment=None, seed: int = 0,
                 fast_decode: bool = True, rows: Optional[np.ndarray] = None):  # fmt: skip
        """The images of ds (a loaded, unselected Dataset) at `rows` of its Arrow table (all: None)."""
        import datasets

        self.rows = np.arange(len(ds)) if rows is None else np.asarray(rows)
        super().__init__(column(ds, label_column)[self.rows], size, augment, seed)
        self.image_column, self.fast_decode = image_column, fast_decode
        self.raw = ds.cast_column(image_column, datasets.Image(decode=False))  # {bytes, path} storage
        self._column = None

    def __getstate__(self) -> dict:  # DataLoader workers: an Arrow column would pickle with all its data
        return {**self.__dict__, "_column": None}

    def subset(self, indices: torch.Tensor) -> "HFImages":
        sub = self.augmented(self.augment, self.seed)
        sub.rows, sub.labels = self.rows[indices.numpy()], self.labels[indices]
        return sub

    def _value(self, index: int):
        """The image's {bytes, path} straight from the memory-mapped Arrow table (5 us; a datasets row: 36 us)."""
        if self._column is None:
            self._column = self.raw.data.table.column(self.image_column)
            self._starts = np.cumsum([0] + [len(c) for c in self._column.chunks])
        row = int(self.rows[index])
        chunk = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self._column.chunk(chunk)[row - int(self._starts[chunk])]

    def encoded(self, index: int) -> bytes:
        value = self._value(index)
        data = value["bytes"]
        # A zero-copy view of the Arrow buffer (as bytes-like unsigned chars), not a copy of the bytes.
        return memoryview(data.as_buffer()).cast("B") if data.is_valid else Path(value["path"].as_py()).read_bytes()

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        try:
            if not self.fast_decode:  # the whole image decoded, then cropped (the same boxes)
                return super().__getitem__(key)
            image = decode_item(self.encoded(index), self.augment, item_rng(self.seed, epoch, index), self.size)
        except Exception as e:  # noqa: BLE001 - named, with the way out, even from a DataLoader worker
            raise unreadable(self._value(index)["path"].as_py() or f"row {int(self.rows[index])} of the data", e) from e
        return {"image": image, "label": self.labels[index]}

    def _image(self, index: int) -> torch.Tensor:
        return pil_decode(self.encoded(index)).permute(2, 0, 1)


def collate(batch: list[dict]) -> dict:
    """torch's default_collate, except that views' photometric augmentations are applied here (Crops) and images
    keep their memory layout. decode_crop's come out channels-last
    (height, width, channel in memory, as libjpeg and the resize write them): stacked into a contiguous
    (N, C, H, W) batch each would be transposed (0.1 ms at 224 px); stacked as (N, H, W, C) they are copied, and
    the batch is their channels-last (N, C, H, W) view, which the loop makes contiguous on the device."""
    from torch.utils.data import default_collate

    if isinstance(batch[0]["image"], Crops):  # views, their photometric augmentations applied here, view by view
        out = default_collate([{**item, "image": list(item["image"])} for item in batch])
        pending = [item["image"].pending for item in batch]
        out["image"] = [crops if pending[0][v] is None else photometric(crops, [p[v] for p in pending]) for v, crops in enumerate(out["image"])]
        return out
    if isinstance(batch[0]["image"], list) or batch[0]["image"].stride(0) != 1:  # views, or (C, H, W) in memory
        return default_collate(batch)
    out = default_collate([{**item, "image": item["image"].permute(1, 2, 0)} for item in batch])
    out["image"] = out["image"].permute(0, 3, 1, 2)
    return out


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, so the order of every epoch is known on resume (set_epoch, as torch's
    DistributedSampler). Yields (epoch, index) keys, num_samples of them: a whole number of global batches, so
    processes and accumulation split evenly."""

    def __init__(self, size: int, seed: int, num_samples: Optional[int] = None):
        self.size, self.seed, self.epoch = size, seed, 0
        self.num_samples = size if num_samples is None else num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        epoch = self.epoch
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return iter([(epoch, i) for i in torch.randperm(self.size, generator=g)[: self.num_samples].tolist()])
