"""--streaming: parquet row groups read as a stream, split across processes, resumed exactly."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ssvit.config import TrainConfig
from ssvit.errors import UsageError
from ssvit.stream import shuffle_buffer_order, streaming_splits

from conftest import tiny_args

MICRO = 8


def stream(shards, rank=0, world=1, workers=2, **cfg):
    cfg = TrainConfig(data=f"parquet:{shards}", streaming=True, img_size=16, shuffle_buffer=30, **cfg)
    splits = streaming_splits(cfg, rank, world, MICRO)
    splits.train.set_workers(workers)
    return splits


def rows_read(train, workers=2, epoch=0, consumed=0) -> list[int]:
    train.set_position(epoch, consumed)
    return [r for batch in DataLoader(train, batch_size=MICRO, num_workers=workers) for r in batch["row"].tolist()]


def test_a_shuffle_buffer_emits_every_item_once_and_never_far_ahead_of_reading():
    order = shuffle_buffer_order(1000, 50, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(1000))
    assert (order[: 1000 - 50] <= np.arange(50, 1000)).all()  # emission k happens after reading item k + 49 at most
    assert not (order == np.arange(1000)).all()


def test_two_processes_read_disjoint_row_groups_and_together_the_whole_epoch(shards):
    parts = [stream(shards, rank, 2).train for rank in (0, 1)]
    train_rows = set(parts[0].train_rows.tolist())
    seen = [rows_read(p) for p in parts]
    for rows, part in zip(seen, parts):
        assert len(rows) == len(set(rows)) == len(part)  # no image twice; as many as the epoch promises
        assert set(rows) <= train_rows  # nothing held out is trained on
    groups = [set(parts[0].groups.of(np.asarray(rows)).tolist()) for rows in seen]
    assert not groups[0] & groups[1]  # disjoint row groups: each process reads only its own
    # Complete: what rests this epoch is under one row group per process plus a partial batch per worker.
    rest = len(train_rows) - len(set(seen[0]) | set(seen[1]))
    assert 0 <= rest < 2 * (10 + 2 * MICRO)
    assert rows_read(parts[0], epoch=1) != seen[0]  # a new order every epoch


@pytest.mark.parametrize("consumed", [1, 5, 6])
def test_a_resumed_stream_continues_with_exactly_the_images_an_uninterrupted_one_reads(shards, consumed):
    train = stream(shards).train
    whole = rows_read(train)
    assert rows_read(train, consumed=consumed) == whole[consumed * MICRO :]  # same images, same order, buffer included


def test_streaming_refusals_name_the_way_out(shards, tmp_path):
    with pytest.raises(UsageError, match="--streaming reads parquet shards.*ssvit prepare"):
        streaming_splits(TrainConfig(data=f"imagefolder:{tmp_path}", streaming=True), 0, 1, MICRO)
    with pytest.raises(UsageError, match="label_fraction.*without --streaming"):
        stream(shards, label_fraction=0.1)
    with pytest.raises(UsageError, match="whole row groups.*smaller row groups"):
        stream(shards, rank=0, world=16, workers=2)
    with pytest.raises(FileNotFoundError, match="none does not exist"):
        streaming_splits(TrainConfig(data=f"parquet:{tmp_path}/none", streaming=True), 0, 1, MICRO)


def test_streamed_data_trains_with_held_out_validation_and_test(shards, tmp_path):
    from ssvit.pretrain import main

    result = main(tiny_args(tmp_path, "--data", f"parquet:{shards}", "--streaming", "--test_fraction", "0.1",
                            "--dataloader_num_workers", "2", "--eval_steps", "4"))  # fmt: skip
    assert result["steps"] == 4 and "streamed" in result["data"] and "test/loss" in result
    assert torch.isfinite(torch.tensor(result["val/loss"]))


def test_what_a_hostile_tester_streams(shards, tmp_path):
    """One step off the tested path: a truncated shard, a corrupt image, unlabeled shards, plain bytes columns."""
    import io
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from ssvit.pretrain import main

    truncated = tmp_path / "truncated"
    shutil.copytree(shards, truncated)
    victim = truncated / "train-00001-of-00003.parquet"
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(UsageError, match="train-00001-of-00003.parquet is not a readable parquet file"):
        stream(truncated)

    # Plain parquet (no datasets metadata): image bytes in a binary column, no labels; one image corrupt.
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(png, format="PNG")
    images = [png.getvalue()] * 80
    images[37] = b"not an image"
    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(pa.table({"jpeg": pa.array(images, pa.binary())}), plain / "train.parquet", row_group_size=10)
    with pytest.raises(UsageError, match="No image column.*--image_column"):
        stream(plain)
    splits = stream(plain, image_column="jpeg", workers=1)
    assert splits.num_classes == 0 and "no labels" in splits.description
    with pytest.raises(UsageError, match=r"Could not decode the image at row 7 of row group 3 of .*train.parquet"):
        rows_read(splits.train, workers=0)
    # Unlabeled shards train a self-supervised objective; a supervised one is refused up front.
    good = tmp_path / "good"
    good.mkdir()
    pq.write_table(pa.table({"jpeg": pa.array([png.getvalue()] * 80, pa.binary())}), good / "train.parquet", row_group_size=10)
    args = tiny_args(tmp_path, "--data", f"parquet:{good}", "--streaming", "--image_column", "jpeg", "--val_fraction", "0.1")
    assert main(args)["steps"] == 4
    with pytest.raises(UsageError, match="needs labels"):
        main([*tiny_args(tmp_path / "sup", objective="supervised"), "--data", f"parquet:{good}", "--streaming", "--image_column", "jpeg"])


@pytest.mark.parametrize("test_fraction", [None, 0.1])
def test_map_style_and_streamed_data_hold_out_the_same_stratified_images(shards, test_fraction):
    """One split implementation (data.held_out_splits): the same --split_seed gives the same validation (and test)
    images with or without --streaming, stratified by class in both."""
    from ssvit.data import load_splits

    cfg = dict(data=f"parquet:{shards}", img_size=16, val_fraction=0.1, test_fraction=test_fraction, split_seed=3)
    mapped = load_splits(TrainConfig(**cfg))
    streamed = streaming_splits(TrainConfig(**cfg, streaming=True), 0, 1, MICRO)
    images = lambda split: sorted(split[i]["image"].numpy().tobytes() for i in range(len(split)))  # noqa: E731
    assert len(mapped.val) == len(streamed.val) == 24 and images(mapped.val) == images(streamed.val)
    assert sorted(mapped.val.labels.tolist()) == sorted(streamed.val.labels.tolist())
    per_class = torch.bincount(streamed.val.labels, minlength=10)
    assert per_class.min() >= 2 and per_class.max() <= 3  # 24 classes-balanced images of 10 classes: stratified
    if test_fraction:
        assert len(mapped.test) == len(streamed.test) == 24 and images(mapped.test) == images(streamed.test)
        assert not set(images(mapped.test)) & set(images(mapped.val))
    other = streaming_splits(TrainConfig(**{**cfg, "split_seed": 4}, streaming=True), 0, 1, MICRO)
    assert images(other.val) != images(streamed.val)
