"""Data contracts: every loading path on local files, held-out validation, label subsets, clear errors."""

import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ssvit.config import TrainConfig
from ssvit.data import load_splits, synthetic_images

from conftest import CIFAR


def cfg(data, **kw):
    """The typed config the loaders take (a stand-in with only some fields would pass where users' configs fail)."""
    return TrainConfig(**{**dict(data=data, img_size=16, val_fraction=0.25), **kw})


def png(color, size=20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def parquet_file(tmp_path):
    """A small dataset in the Hugging Face hub layout (image bytes + ClassLabel), like ../shared CIFAR-10."""
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["red", "blue"])})
    rows = {"img": [{"bytes": png((255, 0, 0) if i % 2 == 0 else (0, 0, 255)), "path": None} for i in range(40)],
            "label": [i % 2 for i in range(40)]}  # fmt: skip
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def test_synthetic_is_deterministic_and_balanced():
    a, la = synthetic_images(200, 16, seed=3)
    b, lb = synthetic_images(200, 16, seed=3)
    assert torch.equal(a, b) and torch.equal(la, lb) and a.dtype == torch.uint8 and a.shape == (200, 3, 16, 16)
    assert torch.bincount(la).tolist() == [20] * 10
    assert not torch.equal(a, synthetic_images(200, 16, seed=4)[0])


def test_parquet_columns_detected_and_validation_held_out(parquet_file):
    splits = load_splits(cfg(f"parquet:{parquet_file}"))
    assert len(splits.train) == 30 and len(splits.val) == 10 and splits.class_names == ["red", "blue"]
    item = splits.val[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.uint8  # resized 20 -> 16 once
    red = item["image"][:, 8, 8].tolist() == [255, 0, 0]
    assert red == (item["label"].item() == 0)
    assert torch.bincount(splits.val.labels).tolist() == [5, 5]  # stratified
    # The same split every time (seeded), disjoint from train.
    again = load_splits(cfg(f"parquet:{parquet_file}"))
    assert torch.equal(again.val.images, splits.val.images)


def test_label_subsets_are_class_balanced_and_seeded(parquet_file):
    per_class = load_splits(cfg(f"parquet:{parquet_file}", samples_per_class=3))
    assert torch.bincount(per_class.train.labels).tolist() == [3, 3]
    frac = load_splits(cfg(f"parquet:{parquet_file}", label_fraction=0.2))
    assert torch.bincount(frac.train.labels).tolist() == [3, 3]  # 20% of 15 per class
    assert len(frac.val) == 10  # validation is never subset


def test_imagefolder(tmp_path):
    for name, color in (("cat", (10, 200, 10)), ("dog", (200, 10, 10))):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.new("RGB", (24, 24), color).save(tmp_path / name / f"{i}.png")
    splits = load_splits(cfg(f"imagefolder:{tmp_path}"))
    assert splits.num_classes == 2 and len(splits.train) + len(splits.val) == 8


def test_missing_path_and_missing_column_are_clear_errors(parquet_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_splits(cfg(f"parquet:{tmp_path / 'nope.parquet'}"))
    with pytest.raises(ValueError, match=r"No image column named 'image'.*\['img', 'label'\].*--image_column"):
        load_splits(cfg(f"parquet:{parquet_file}", image_column="image"))


def test_corrupt_image_names_the_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / d / f"{i}.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(ValueError, match="broken.png"):
        load_splits(cfg(f"imagefolder:{tmp_path}", val_fraction=0.5))


def test_augmentation_depends_on_epoch_and_index_only():
    splits = load_splits(cfg("synthetic:100"))
    ds = splits.train
    first = ds[5]["image"]
    torch.rand(10)  # other use of the global RNG does not change the data
    assert torch.equal(ds[5]["image"], first) and torch.equal(ds[(0, 5)]["image"], first)
    assert not torch.equal(ds[(1, 5)]["image"], first)  # the epoch is part of the key (EpochSampler yields it)
    assert torch.equal(ds.augmented(None)[5]["image"], splits.train.images[5])  # evaluation sees the image as stored


@pytest.mark.skipif(not CIFAR.exists(), reason="../shared CIFAR-10 not present")
def test_shared_cifar10_loads_with_a_held_out_split():
    splits = load_splits(cfg(f"parquet:{CIFAR}", img_size=32, val_fraction=0.02))
    assert len(splits.train) == 49_000 and len(splits.val) == 1_000 and splits.num_classes == 10


def test_augmentation_draws_exactly_as_torchvision():
    from torchvision.transforms import v2

    from ssvit.data import Augmentation

    img = torch.randint(0, 255, (3, 300, 200), dtype=torch.uint8)
    theirs = v2.Compose([v2.RandomResizedCrop(32, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip()])
    ours = Augmentation(32, (0.35, 1.0))
    for seed in range(100):
        torch.manual_seed(seed)
        expected = theirs(img)
        torch.manual_seed(seed)
        assert torch.equal(ours(img), expected)


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    values = torch.cat([a, b]).unique()
    cdf = lambda x: torch.searchsorted(x.sort().values, values, right=True) / len(x)  # noqa: E731
    return (cdf(a) - cdf(b)).abs().max().item()


def test_per_item_crop_boxes_are_distributed_as_torchvisions():
    """ssvit's loaders draw each item's box and flip from the item's own random.Random (5 us; a torch.Generator's
    draws take 70): the boxes must be distributed as torchvision's RandomResizedCrop + RandomHorizontalFlip."""
    from torchvision.transforms import v2

    from ssvit.data import Augmentation, item_rng

    height, width, n = 375, 500, 4000
    image = torch.empty(3, height, width)
    ours = torch.tensor([Augmentation(224, (0.08, 1.0)).draw(height, width, item_rng(0, 0, k)) for k in range(n)], dtype=torch.float64)
    torch.manual_seed(0)
    theirs = torch.tensor([(*v2.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]), torch.rand(1).item() < 0.5)
                           for _ in range(n)], dtype=torch.float64)  # fmt: skip
    critical = 1.95 * (2 / n) ** 0.5  # KS at the 0.1% level (deterministic seeds: the test does not flake)
    for k, name in enumerate(("top", "left", "height", "width", "flip")):
        assert ks_statistic(ours[:, k], theirs[:, k]) < critical, name
    # ...and the test can tell a different augmentation apart: the paper's CIFAR scale (0.35, 1).
    other = torch.tensor([Augmentation(224, (0.35, 1.0)).draw(height, width, item_rng(0, 0, k)) for k in range(n)], dtype=torch.float64)
    assert ks_statistic(other[:, 2], theirs[:, 2]) > 3 * critical


def test_fast_decode_reads_gray_cmyk_and_png_and_names_a_truncated_jpeg(tmp_path):
    """libjpeg-turbo decodes what it can; PIL what it cannot (CMYK, PNG); a broken file is named, with its row."""
    from ssvit.data import Augmentation, HFImages

    def encode(img, fmt="JPEG"):
        buf = io.BytesIO()
        img.save(buf, format=fmt, quality=95)
        return buf.getvalue()

    y, x = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 48), indexing="ij")
    rgb = Image.fromarray((torch.stack([x, y, 1 - x], -1) * 255).byte().numpy())
    sources = [encode(rgb), encode(rgb.convert("L")), encode(rgb.convert("CMYK")), encode(rgb, "PNG")]
    ds = datasets.Dataset.from_dict({"img": [{"bytes": b, "path": None} for b in sources]}, features=datasets.Features({"img": datasets.Image()}))
    images = HFImages(ds, "img", None, 48, augment=Augmentation(48, (1.0, 1.0), (1.0, 1.0), hflip=False))  # the whole image
    for k, source in enumerate(sources):
        expected = torch.from_numpy(np.array(Image.open(io.BytesIO(source)).convert("RGB"))).permute(2, 0, 1)
        assert images[k]["image"].float().sub(expected.float()).abs().mean() < 1, k

    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(sources[0][: len(sources[0]) // 2])
    ds = datasets.Dataset.from_dict({"img": [{"bytes": None, "path": str(truncated)}]}, features=datasets.Features({"img": datasets.Image()}))
    with pytest.raises(ValueError, match=r"Could not decode the image at .*truncated\.jpg.*Remove or fix it"):
        HFImages(ds, "img", None, 48, augment=Augmentation(48))[0]


def test_fast_jpeg_decode_draws_the_same_crop_boxes_as_the_full_decode(tmp_path, monkeypatch):
    from ssvit.data import Augmentation, HFImages

    def photo(i):  # smooth content, so that decoding at a reduced DCT scale changes pixels little
        y, x = torch.meshgrid(torch.linspace(0, 1, 360), torch.linspace(0, 1, 480), indexing="ij")
        rgb = torch.stack([x, y, (x * y + i / 40) % 1]) * 255
        buf = io.BytesIO()
        Image.fromarray(rgb.permute(1, 2, 0).byte().numpy()).save(buf, format="JPEG", quality=95)
        return {"bytes": buf.getvalue(), "path": None}

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"img": [photo(i) for i in range(40)], "label": [i % 2 for i in range(40)]}, features=features)
    augment = Augmentation(32, (0.08, 1.0))  # small crops too: 1/8 scale decoding happens
    boxes = {True: [], False: []}
    draw = Augmentation.draw
    for fast in (True, False):
        monkeypatch.setattr(Augmentation, "draw", lambda self, h, w, g=None, fast=fast: boxes[fast].append(draw(self, h, w, g)) or boxes[fast][-1])
        images = HFImages(ds, "img", "label", 32, augment=augment, seed=3, fast_decode=fast)
        boxes[fast].append([images[(epoch, i)]["image"] for epoch in (0, 1) for i in range(40)])
    fast_images, full_images = boxes[True].pop(), boxes[False].pop()
    assert boxes[True] == boxes[False] and len(boxes[True]) == 80  # the same boxes and flips, item for item
    diff = torch.stack(fast_images).float().sub(torch.stack(full_images).float()).abs().mean()
    assert diff < 4  # the same crops, up to the decoder's scale and the resampling (out of 255)


def test_collate_keeps_channels_last_images_as_they_are():
    """decode_crop's images are channels-last in memory: ssvit's collate copies them into a channels-last batch
    (the default collate transposes each one: 0.1 ms at 224 px) with the same values; other images as default."""
    from torch.utils.data import default_collate

    from ssvit.data import collate

    hwc = [{"image": torch.randint(0, 255, (8, 6, 3), dtype=torch.uint8).permute(2, 0, 1), "label": torch.tensor(i)} for i in range(4)]
    chw = [{"image": item["image"].contiguous(), "label": item["label"]} for item in hwc]
    for items in (hwc, chw):
        ours, theirs = collate(items), default_collate(items)
        assert torch.equal(ours["image"], theirs["image"]) and torch.equal(ours["label"], theirs["label"])
    assert collate(hwc)["image"].is_contiguous(memory_format=torch.channels_last)
    assert collate(chw)["image"].is_contiguous()


@pytest.mark.parametrize("cached", [True, False], ids=["uint8_cache", "decoded_per_image"])
def test_every_image_keeps_its_label_through_hold_out_and_subsets(tmp_path, monkeypatch, cached):
    """Each image is a flat colour that names its row: after the held-out split (an indices mapping in datasets)
    and a label subset, every item's label is its own row's, and train and validation cover each row once."""
    if not cached:
        monkeypatch.setenv("SSVIT_MAX_CACHE_BYTES", "0")
    labels = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list("abcd"))})
    rows = {"img": [{"bytes": png((6 * i, 255 - 6 * i, 128)), "path": None} for i in range(40)], "label": labels}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "train.parquet"))
    seen = []
    for c in (cfg(f"parquet:{tmp_path / 'train.parquet'}"), cfg(f"parquet:{tmp_path / 'train.parquet'}", label_fraction=0.5)):
        splits = load_splits(c)
        assert ("decoded per image" in splits.description) != cached
        for part in (splits.train, splits.val, splits.train.augmented(None)):
            for k in range(len(part)):
                item = part[k]
                row = round(item["image"][0].float().mean().item() / 6)
                assert int(item["label"]) == labels[row], (part, k, row)
                if c.label_fraction is None and part is not splits.train:
                    seen.append(row)
    assert sorted(seen) == list(range(40))  # unaugmented train + validation: every row once
