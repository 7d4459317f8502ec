"""ssvit.prepare: an image folder to parquet shards in the hub layout, odd files included, done once."""

import io

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ssvit.jpeg import layout
from ssvit.prepare import main as prepare_main
from ssvit.pretrain import main as pretrain_main

from conftest import IMAGENET_SAMPLE, tiny_args


@pytest.fixture
def odd_folder(tmp_path):
    """ImageNet's layout with what ImageNet holds: RGB, grayscale and CMYK JPEGs, a PNG named .JPEG, and a
    file that is not an image at all."""
    root = tmp_path / "src/train"
    for c, name in enumerate(("n01", "n02")):
        (root / name).mkdir(parents=True)
        for i in range(6):
            colour = (200 * c, 30 * i, 100)
            Image.new("RGB", (64 + 8 * i, 48), colour).save(root / name / f"{name}_{i}.JPEG", quality=95)
    Image.new("L", (60, 40), 128).save(root / "n01/gray.JPEG")
    Image.new("CMYK", (60, 40), (0, 255, 255, 0)).save(root / "n02/cmyk.JPEG")
    Image.new("RGB", (50, 50), (220, 0, 0)).save(root / "n02/png_inside.JPEG", format="PNG")
    (root / "n01/broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return tmp_path / "src"


def test_prepare_round_trip_refuses_the_broken_file_and_runs_once(odd_folder, tmp_path):
    out = tmp_path / "shards"
    summary = prepare_main([f"imagefolder:{odd_folder}", "--out", str(out), "--max_side", "32", "--shard_mb", "0.001",
                            "--workers", "2"])  # fmt: skip
    assert summary["written"] == {"train": 15} and summary["refused"] == 1
    assert "broken.JPEG" in (out / "refused.txt").read_text()
    shards = sorted(p.name for p in out.glob("*.parquet"))
    assert len(shards) > 1 and shards[0] == f"train-00000-of-{len(shards):05d}.parquet"  # the hub's names
    ds = datasets.load_dataset("parquet", data_dir=str(out))["train"]  # plain datasets reads it
    assert ds.features["label"].names == ["n01", "n02"] and len(ds) == 15
    for row in ds:
        image = row["image"]
        assert image.mode == "RGB" and min(image.size) == 32  # the shorter side, re-encoded
    # Labels and pixels as written: every n02 image is red (200 or more, the CMYK one too), no n01 image is.
    reds = {label: [] for label in (0, 1)}
    for row in ds:
        reds[row["label"]].append(np.asarray(row["image"])[..., 0].mean())
    assert min(reds[1]) > 150 > max(reds[0])
    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare_main([f"imagefolder:{odd_folder}", "--out", str(out), "--max_side", "32", "--shard_mb", "0.001"])
    assert again["fingerprint"] == summary["fingerprint"] and {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    result = pretrain_main(tiny_args(tmp_path, "--data", f"parquet:{out}", "--batch_size", "4", "--max_steps", "2",
                                     "--val_fraction", "0.2"))  # fmt: skip
    assert result["steps"] == 2


@pytest.mark.skipif(not IMAGENET_SAMPLE.exists(), reason="../shared ImageNet sample not present")
def test_prepare_the_shared_imagenet_sample_and_train_at_224(tmp_path):
    out = tmp_path / "imagenet"
    summary = prepare_main([f"imagefolder:{IMAGENET_SAMPLE}", "--out", str(out), "--max_side", "256", "--workers", "2"])
    assert summary["written"]["train"] + summary["refused"] == 1000
    groups = [pq.ParquetFile(f).metadata for f in sorted(out.glob("train-*.parquet"))]
    assert max(m.row_group(g).num_rows for m in groups for g in range(m.num_row_groups)) == 100
    first = datasets.load_dataset("parquet", data_dir=str(out))["train"].select(range(100))
    assert len(set(first["label"])) > 80  # rows shuffled: a row group mixes the classes (the source is class by class)
    raw = first.cast_column("image", datasets.Image(decode=False))["image"]
    assert all(layout(image["bytes"]) is not None for image in raw)  # restart markers: loaders decode only the crop's rows
    tiny_224 = ["--img_size", "224", "--batch_size", "8", "--max_steps", "2", "--model_kwargs", "{patch_size: 16, embed_dim: 32, depth: 1, num_heads: 2}"]
    for streaming in ([], ["--streaming", "--dataloader_num_workers", "2"]):
        result = pretrain_main(tiny_args(tmp_path / str(bool(streaming)), "--data", f"parquet:{out}", *tiny_224, *streaming))
        assert result["steps"] == 2 and ("streamed" in result["data"]) == bool(streaming)


def test_an_interrupted_prepare_is_rebuilt_and_other_settings_are_refused(odd_folder, tmp_path, capsys):
    from ssvit.errors import UsageError

    out = tmp_path / "shards"
    args = [f"imagefolder:{odd_folder}", "--out", str(out), "--max_side", "32", "--workers", "1"]
    prepare_main(args)
    (out / "prepare.json").unlink()  # as if killed between the last shard and the manifest
    assert prepare_main(args)["written"] == {"train": 15} and "did not finish" in capsys.readouterr().out
    with pytest.raises(UsageError, match=r"another source or with other settings \(its prepare.json; max_side 32 -> 48\)"):
        prepare_main([*args[:-2], "--max_side", "48"])
    Image.new("RGB", (64, 48), (0, 0, 0)).save(odd_folder / "train/n01/n01_0.JPEG")  # a source file replaced
    with pytest.raises(UsageError, match=r"the same settings, other source files"):
        prepare_main(args)


def test_a_parquet_source_is_read_a_chunk_at_a_time_and_a_bad_row_is_named(tmp_path):
    """A parquet source carries its images' bytes (ImageNet from the hub: 150 GB): prepare holds a bounded part of
    them in memory, never the whole column, and names a refused image by its row."""
    import tracemalloc

    rng = np.random.default_rng(0)
    rows = {"image": [], "label": []}
    for i in range(6000):
        jpeg = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, format="JPEG", quality=95)
        rows["image"].append({"bytes": jpeg.getvalue() if i != 1234 else b"not an image", "path": None})
        rows["label"].append(i % 2)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    source = tmp_path / "source.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(source))
    total = sum(len(r["bytes"]) for r in rows["image"])
    del rows
    datasets.load_dataset("parquet", data_files=str(source))  # its Arrow cache, written before we measure
    tracemalloc.start()
    try:
        summary = prepare_main([f"parquet:{source}", "--out", str(tmp_path / "out"), "--workers", "1", "--shard_mb", "0.5"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # 15% here, and bounded (29% with half as many images); 114% when the whole column was read at once.
    assert peak < 0.5 * total, f"prepare held {peak / total:.0%} of the source's {total / 2**20:.1f} MiB of images"
    assert summary["written"] == {"train": 5999} and summary["refused"] == 1
    assert "train\trow 1234 of the source\t" in (tmp_path / "out/refused.txt").read_text()


def test_a_full_disk_while_writing_shards_is_named_with_the_space_needed(odd_folder, tmp_path, monkeypatch):
    import errno

    from ssvit.errors import UsageError

    real, calls = datasets.Dataset.to_parquet, []

    def to_parquet(self, path, **kwargs):  # the second shard finds the disk full, half written
        calls.append(path)
        if len(calls) == 2:
            open(path, "wb").write(b"PAR1 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, path, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "to_parquet", to_parquet)
    out = tmp_path / "shards"
    with pytest.raises(UsageError, match=r"No space left on device\) after \d+ of 16 train images\. The train shards need "
                                         r"about .* MiB .* free there\. Free some space or choose another --out"):  # fmt: skip
        prepare_main([f"imagefolder:{odd_folder}", "--out", str(out), "--max_side", "32", "--shard_mb", "0.001"])
    assert not out.exists()  # no partial shard, no prepare.json, not even the folder it made: a rerun starts over


def test_impossible_settings_are_refused_before_the_source_is_read(tmp_path):
    from ssvit.errors import UsageError

    (tmp_path / "a_file").write_text("")
    # A source that does not exist: the settings are checked first (scanning ImageNet takes minutes).
    with pytest.raises(UsageError, match=r"--max_side -5 .*--quality 150 .*--shard_mb 0.0 .*--workers 0 .*a_file \(a file: give a folder\)"):
        prepare_main(["imagefolder:/nonexistent", "--out", str(tmp_path / "a_file"), "--max_side", "-5", "--quality", "150",
                      "--shard_mb", "0", "--workers", "0"])  # fmt: skip


def test_a_plain_parquet_source_with_other_column_names(tmp_path):
    """Parquet written by other tools: JPEG bytes in a binary column, labels in an int column, neither named as
    datasets names them. The error says which flag names them, and prepare has that flag."""
    import pyarrow as pa

    from ssvit.errors import UsageError

    jpegs = []
    for i in range(6):
        jpeg = io.BytesIO()
        Image.new("RGB", (80, 40), (100 * (i % 3), 0, 0)).save(jpeg, format="JPEG")  # red tells the label
        jpegs.append(jpeg.getvalue())
    pq.write_table(pa.table({"jpg": jpegs, "cls": [i % 3 for i in range(6)]}), tmp_path / "src.parquet", row_group_size=2)
    source, out = f"parquet:{tmp_path / 'src.parquet'}", tmp_path / "out"
    with pytest.raises(UsageError, match=r"No image column .* \['jpg', 'cls'\]\. Name it with --image_column"):
        prepare_main([source, "--out", str(out)])
    prepare_main([source, "--out", str(out), "--max_side", "20", "--image_column", "jpg", "--label_column", "cls"])
    with pytest.raises(UsageError, match=r"label_column 'cls' -> None"):  # unlabeled now: not taken as done
        prepare_main([source, "--out", str(out), "--max_side", "20", "--image_column", "jpg"])
    ds = datasets.load_dataset("parquet", data_dir=str(out))["train"]
    assert sorted(ds["label"]) == [0, 0, 1, 1, 2, 2] and ds[0]["image"].size == (40, 20)
    assert all(abs(np.asarray(row["image"])[..., 0].mean() - 100 * row["label"]) < 20 for row in ds)  # labels stay with their images


def test_a_second_prepare_into_a_folder_in_use_is_refused(odd_folder, tmp_path):
    import json
    import os
    import socket

    from ssvit.errors import UsageError

    out = tmp_path / "shards"
    out.mkdir()
    (out / ".train-00000.parquet.tmp").write_bytes(b"being written by the other run")
    (out / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    with pytest.raises(UsageError, match=r"--out .* is in use by another run \(pid \d+"):
        prepare_main([f"imagefolder:{odd_folder}", "--out", str(out), "--max_side", "32"])
    assert (out / ".train-00000.parquet.tmp").exists()  # the other run's shard is left alone
