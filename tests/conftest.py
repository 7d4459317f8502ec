"""Shared helpers: tiny configs that run the real code paths in seconds, on local data only."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "train.parquet"
IMAGENET_SAMPLE = ROOT.parent / "shared" / "data" / "imagenet-sample"

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share the cores: a test that trains in-process with torch's
    import torch  # default threads spun against the other worker's (a 2 s test took 26 s in the suite)

    torch.set_num_threads(1)

# A ViT small enough for 2 CPU cores: 16px images, 4px patches (16 tokens), 2 blocks of width 32.
TINY_VIT = ["--model", "vit_tiny_patch16_224", "--img_size", "16",
            "--model_kwargs", "{patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}"]  # fmt: skip


def tiny_args(tmp_path: Path, *extra: str, objective: str = "masked_patch") -> list[str]:
    return [
        "--objective", objective, *TINY_VIT, "--data", "synthetic:600", "--batch_size", "16",
        "--max_steps", "4", "--warmup_steps", "1", "--logging_steps", "1", "--eval_steps", "100",
        "--save_steps", "100", "--mixed_precision", "no", "--report_to", "[]", "--eval_batches", "2",
        "--output_dir", str(tmp_path / "run"), "--cpu_threads", "1", *extra,
    ]  # fmt: skip


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Decoded-image caches and Hugging Face datasets' Arrow caches go to the session's temporary folder, never the
    user's ~/.cache (each test's parquet files would otherwise stay there as Arrow copies, a gigabyte per run)."""
    import datasets
    import ssvit.data

    cache = tmp_path_factory.getbasetemp() / "ssvit-cache"
    monkeypatch.setattr(ssvit.data, "CACHE_DIR", cache)
    monkeypatch.setenv("SSVIT_CACHE", str(cache))
    hf_cache = tmp_path_factory.getbasetemp() / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # The libraries read those variables once, at import: offline in this process too (a hub name fails at once
    # instead of after the network's timeouts).
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def subprocess_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


PYTHON = sys.executable


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step from a run's metrics.jsonl; a line cut by SIGKILL mid-write is not a row."""
    import json

    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def write_shards(out: Path, n: int = 240, files: int = 3, group: int = 10, size: int = 16) -> Path:
    """Synthetic images as parquet shards in the hub layout (train-0000i-of-0000N.parquet), PNG bytes, `group`
    rows per row group: the input of --streaming."""
    import io

    import datasets
    from PIL import Image

    from ssvit.data import SYNTHETIC_CLASSES, synthetic_images

    images, labels = synthetic_images(n, size, seed=5)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(SYNTHETIC_CLASSES))})
    out.mkdir(parents=True, exist_ok=True)
    per = n // files
    for f in range(files):
        rows = {"image": [], "label": []}
        for i in range(f * per, (f + 1) * per):
            png = io.BytesIO()
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(png, format="PNG")
            rows["image"].append({"bytes": png.getvalue(), "path": None})
            rows["label"].append(int(labels[i]))
        path = out / f"train-{f:05d}-of-{files:05d}.parquet"
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path), batch_size=group)
    return out


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"))
