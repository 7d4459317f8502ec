"""Prepare a data set once: image folder (or any --data source) to parquet shards in the Hugging Face layout.

    python -m ssvit.prepare imagefolder:/data/imagenet --out /data/imagenet-shards --max_side 320
    accelerate launch ssvit/pretrain.py --data parquet:/data/imagenet-shards ...

Writes DIR/<split>-00000-of-000NN.parquet (columns image, label; ClassLabel names kept) that plain
``datasets.load_dataset("parquet", data_dir=DIR)`` reads. Every image is decoded, converted to RGB (grayscale,
CMYK and palette images included, and a PNG named .JPEG) and, with --max_side N, re-encoded as JPEG so that its
*shorter* side is at most N pixels. Rows are written in a seeded random order (--seed), so that every shard and
every row group (ROW_GROUP = 100 images) mixes the classes: a stream (--streaming) reads whole
row groups, and a shuffle buffer cannot mix a stream written class by class. The shorter side, because a random resized crop at the training resolution
needs pixels across the crop's short side: bounding the longer side would shrink a wide panorama's short side
below the training resolution. An image that cannot be read is refused, counted and named in refused.txt, never
fatal. A second run with the same source and settings finds prepare.json and rebuilds nothing.
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import json
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from ssvit.checkpoints import hold_folder
from ssvit.errors import UsageError


def encode(source, max_side: Optional[int], quality: int) -> tuple[Optional[bytes], str]:
    """(JPEG or original bytes, '') for a readable image, (None, reason) otherwise. `source` is a path or bytes."""
    from PIL import Image

    from ssvit.data import to_rgb

    try:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
        with Image.open(io.BytesIO(raw)) as img:
            if max_side is None and img.format == "JPEG" and img.mode == "RGB":
                img.load()  # decoded whole: a truncated file is refused here (verify() reads no scan data), not in training
                return raw, ""  # a good RGB JPEG is kept as it is, byte for byte
            if max_side is not None and img.format == "JPEG":
                img.draft("RGB", (max_side, max_side))  # libjpeg's DCT scaling: decode at 1/2, 1/4, 1/8 when it can
            img = to_rgb(img)
            if max_side is not None and min(img.size) > max_side:
                scale = max_side / min(img.size)
                img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
            out = io.BytesIO()
            # A restart marker after every row of MCUs: a loader can then decode only the rows a crop needs (ssvit.jpeg).
            img.save(out, format="JPEG", quality=quality, restart_marker_rows=1)
            return out.getvalue(), ""
    except Exception as e:  # noqa: BLE001 - any unreadable file is refused with its reason, never fatal
        return None, f"{type(e).__name__}: {e}"


def _encode_chunk(jobs: list) -> list:
    """(path or None, data, reason) for each (image, max_side, quality): the path names a refused file."""
    return [(job[0] if isinstance(job[0], str) else None, *encode(*job)) for job in jobs]


def _exit_with(parent: int) -> None:
    """Worker initializer: end this worker when prepare is gone. A SIGKILLed parent sends no word, and a forked worker
    holds the task pipe's write end itself, so it would wait on the pipe forever."""
    import threading
    import time

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _ordered_map(pool, fn, items, window: int):
    """pool.map(fn, items) in order, taking `items` lazily, `window` at a time: Executor.map submits, and so reads,
    every item at once, which would hold a parquet source's images in memory whole."""
    items, pending = iter(items), collections.deque()
    while True:
        pending.extend(pool.submit(fn, item) for item in itertools.islice(items, window - len(pending)))
        if not pending:
            return
        yield pending.popleft().result()


def sources(spec: str, image_column: Optional[str] = None, label_column: Optional[str] = None) -> dict:
    """split -> (its image column undecoded, labels (None: unlabeled), class names, data_key) of a --data source. Nothing is
    decoded or read yet: a parquet source holds the images' bytes (150 GB for ImageNet), read a chunk at a time
    by `images`."""
    import datasets

    from ssvit.data import column, columns, data_key, load_source

    out = {}
    for split, ds in load_source(spec).items():
        image_col, label_col = columns(ds, image_column, label_column)
        names = list(getattr(ds.features.get(label_col), "names", None) or [])
        raw = ds.cast_column(image_col, datasets.Image(decode=False)).select_columns([image_col]).with_format("arrow")
        out[split] = (raw, column(ds, label_col).tolist() if label_col else None, names, data_key(ds))
    return out


def images(raw, indices: list[int], chunk: int = 256):
    """The images at `indices`, in that order, as paths (image folders) or bytes, read `chunk` rows at a time."""
    for start in range(0, len(indices), chunk):
        for v in raw[indices[start : start + chunk]].column(0).to_pylist():
            yield v["bytes"] or v["path"]


def fingerprint(spec: str, found: dict, settings: dict) -> str:
    """The source as datasets knows it (data_key: every data file's path and modification time, or the hub revision)
    and the settings: a second run tells what is done without reading a single image."""
    parts = [spec, settings, sorted((split, key) for split, (raw, labels, names, key) in found.items())]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


ROW_GROUP = 100
"""Images per parquet row group: the unit a stream reads and splits between processes (datasets' own size for
image data; its to_parquet would otherwise write one row group for a small shard)."""


def write_shards(split: str, raw, indices: list[int], labels: Optional[list[int]], names: list[str], out: Path,
                 encoding: tuple, shard_bytes: int, workers: int, refused: list, quiet: bool = False) -> int:  # fmt: skip
    """Encode the images at `indices` (with `encoding`: max_side, quality) in worker processes, in order, and write
    shards of about shard_bytes each."""
    import datasets

    columns = {"image": datasets.Image()}
    if labels is not None:  # unlabeled sources stay unlabeled (no column of -1s that would pass for a class)
        columns["label"] = datasets.ClassLabel(names=names) if names else datasets.Value("int64")
    features = datasets.Features(columns)
    shards, rows, size, written, written_bytes = [], {k: [] for k in columns}, 0, 0, 0

    def flush():
        nonlocal rows, size
        if rows["image"]:
            path = out / f".{split}-{len(shards):05d}.parquet.tmp"
            try:
                datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path), batch_size=ROW_GROUP)
            except OSError as e:  # a full disk, a quota, a folder gone: the partial shards are only in the way
                for p in [*shards, path]:
                    p.unlink(missing_ok=True)
                need = written_bytes / written * len(indices) / 2**20
                raise UsageError(f"Writing {path.name} to {out} failed ({e}) after {written} of {len(indices)} {split} "
                                 f"images. The {split} shards need about {need:,.1f} MiB at the size of the images so "
                                 f"far; {shutil.disk_usage(out).free / 2**20:,.0f} MiB are free there. Free some space "
                                 f"or choose another --out, then run the same command again (the partial shards were "
                                 f"removed; it starts over).") from e  # fmt: skip
            shards.append(path)
        rows, size = {k: [] for k in columns}, 0

    jobs = ((image, *encoding) for image in images(raw, indices))
    chunks = iter(lambda: list(itertools.islice(jobs, 16)), [])  # 16 images per task: less pickling overhead
    with ProcessPoolExecutor(workers, initializer=_exit_with, initargs=(os.getpid(),)) as pool:
        results = itertools.chain.from_iterable(_ordered_map(pool, _encode_chunk, chunks, window=4 * workers))
        pairs = zip(indices, labels or itertools.repeat(None), results)
        for index, label, (path, data, reason) in tqdm(pairs, total=len(indices), desc=f"prepare {split}", unit="img", disable=quiet):
            if data is None:
                refused.append(f"{split}\t{path or f'row {index} of the source'}\t{reason}")
                continue
            rows["image"].append({"bytes": data, "path": None})
            if "label" in rows:
                rows["label"].append(label)
            size, written, written_bytes = size + len(data), written + 1, written_bytes + len(data)
            if size >= shard_bytes:
                flush()
    flush()
    for i, path in enumerate(shards):  # the hub's names, now that the count is known
        path.rename(out / f"{split}-{i:05d}-of-{len(shards):05d}.parquet")
    return written


def prepare(spec: str, out: str | Path, max_side: Optional[int] = None, shard_mb: float = 256, workers: Optional[int] = None,
            quality: int = 90, quiet: bool = False, limit: Optional[int] = None, seed: int = 0,
            image_column: Optional[str] = None, label_column: Optional[str] = None) -> dict:  # fmt: skip
    """Write the shards (see the module docstring); `limit`: only the first N images of each split."""
    import numpy as np

    out = Path(out)
    bad = [f"--{name} {value} ({rule})" for name, value, ok, rule in [
        ("max_side", max_side, max_side is None or max_side >= 1, "pixels of the shorter side: 1 or more; omit it to keep sizes"),
        ("quality", quality, 1 <= quality <= 100, "JPEG quality: 1 to 100"),
        ("shard_mb", shard_mb, shard_mb > 0, "MiB per shard: more than 0"),
        ("workers", workers, workers is None or workers >= 1, "processes: 1 or more; omit it for all cores"),
    ] if not ok]  # fmt: skip
    if out.exists() and not out.is_dir():
        bad.append(f"--out {out} (a file: give a folder)")
    if bad:  # before the source is scanned (minutes for ImageNet)
        raise UsageError(f"ssvit.prepare cannot take {'; '.join(bad)}.")
    # "jpeg" names how re-encoded images are written: a folder of an older format is not taken as done.
    settings = {"max_side": max_side, "quality": quality, "shard_mb": shard_mb, "limit": limit, "seed": seed,
                "image_column": image_column, "label_column": label_column, "jpeg": "restart marker every MCU row"}  # fmt: skip
    found = sources(spec, image_column, label_column)
    key = fingerprint(spec, found, settings)
    with hold_folder(out, is_main=True, flag="--out"):  # a second prepare into the folder would delete this one's shards
        manifest = out / "prepare.json"
        if manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") == key:
            summary = json.loads(manifest.read_text())
            print(f"{out} is already prepared from {spec} with these settings: nothing to do.")
            return summary
        if manifest.exists():
            saved = json.loads(manifest.read_text())
            changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in {"source": spec, **settings}.items() if saved.get(k) != v]
            raise UsageError(f"--out {out} was prepared from another source or with other settings (its prepare.json; "
                             f"{', '.join(changed) or 'the same settings, other source files or an older ssvit'}): choose another folder, "
                             f"or delete it to rebuild.")  # fmt: skip
        ours = re.compile(r"(train|validation|test)-\d{5}-of-\d{5}\.parquet")
        leftovers = list(out.glob("*.parquet"))
        if any(not ours.fullmatch(p.name) for p in leftovers):
            raise UsageError(f"--out {out} holds parquet files that ssvit.prepare did not write: choose an empty folder.")
        for p in [*leftovers, *out.glob(".*.parquet.tmp")]:  # an interrupted run (no prepare.json yet): start again
            p.unlink()
        if leftovers:
            print(f"{out}: an earlier run did not finish (no prepare.json); its {len(leftovers)} shards are rebuilt.")
        refused, counts = [], {}
        for split, (raw, labels, names, _) in found.items():
            indices = np.random.default_rng(seed).permutation(len(raw))[:limit].tolist()
            ordered = None if labels is None else [labels[i] for i in indices]
            counts[split] = write_shards(split, raw, indices, ordered, names, out, (max_side, quality), int(shard_mb * 2**20),
                                         workers or os.cpu_count() or 1, refused, quiet)  # fmt: skip
        (out / "refused.txt").write_text("".join(f"{line}\n" for line in refused))
        summary = {"source": spec, "fingerprint": key, **settings, "written": counts, "refused": len(refused)}
        manifest.write_text(json.dumps(summary, indent=2) + "\n")  # last: its presence means the shards are complete
        return summary
