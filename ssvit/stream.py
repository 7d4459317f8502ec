"""--streaming: parquet shards read as a stream, never copied, converted or cached.

Hugging Face datasets' streaming restores a shuffled stream's position but not its shuffle buffer (the buffer's
images are dropped on resume: huggingface/datasets#7444), so ssvit plans the stream itself, from the shards'
metadata alone. The unit of reading is a parquet row group (ssvit.prepare writes 100 images per row group):

    epoch e:  row groups in an order drawn from (seed, e)  ->  one sequence of rows (held-out rows removed)
              -> process p of P takes the p-th contiguous run of whole row groups (disjoint row groups: each process
                 reads only its own) -> DataLoader worker w of W the w-th part of its rows
              -> a shuffle buffer of `buffer_size` rows, its random choices drawn from (seed, e, p, w)

The order of every epoch is thus a function of (seed, epoch, position): a resumed run re-plans the epoch and
fast-forwards without reading what it skips, and sees exactly the images an uninterrupted run sees, in the same
order, buffer included. Each worker yields the same number of batches, so the DataLoader's round robin over
workers is exact. What rests each epoch: the rows beyond a whole number of batches per worker, and with several
processes up to one row group per process (cuts fall between row groups); a different part each epoch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ssvit.errors import UsageError


@dataclass
class RowGroups:
    """The row groups of a list of parquet files, and the global id of each one's first row."""

    files: list[str]
    file: np.ndarray  # (G,) index into files
    group: np.ndarray  # (G,) row group index within its file
    rows: np.ndarray  # (G,) rows in it
    first: np.ndarray  # (G,) global id of its first row

    @classmethod
    def scan(cls, files: list[str]) -> "RowGroups":
        import pyarrow.parquet as pq

        file, group, rows = [], [], []
        for i, path in enumerate(files):
            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as e:  # noqa: BLE001 - a truncated or foreign file: named, before any training
                raise UsageError(f"{path} is not a readable parquet file ({type(e).__name__}: {e}). Remove it from the "
                                 f"folder, or write the shards again with python -m ssvit.prepare.") from e  # fmt: skip
            for g in range(meta.num_row_groups):
                file.append(i), group.append(g), rows.append(meta.row_group(g).num_rows)
        rows = np.asarray(rows, dtype=np.int64)
        first = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
        return cls(list(files), np.asarray(file), np.asarray(group), rows, first)

    @property
    def total(self) -> int:
        return int(self.rows.sum())

    def of(self, rows: np.ndarray) -> np.ndarray:
        """The row group holding each global row id."""
        return np.searchsorted(self.first, rows, side="right") - 1


class Reader:
    """Reads whole row groups (image bytes, label) of RowGroups, keeping the files open."""

    def __init__(self, groups: RowGroups, image_column: str, label_column: Optional[str]):
        self.groups, self.image_column, self.label_column = groups, image_column, label_column
        self._open: dict = {}

    def read(self, g: int) -> tuple[list, Optional[np.ndarray]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        i = int(self.groups.file[g])
        if i not in self._open:
            self._open[i] = pq.ParquetFile(self.groups.files[i])
        columns = [self.image_column] + ([self.label_column] if self.label_column else [])
        table = self._open[i].read_row_group(int(self.groups.group[g]), columns=columns)
        image = table.column(self.image_column).combine_chunks()
        if pa.types.is_struct(image.type):  # datasets' Image: {bytes, path}
            images = list(zip(image.field("bytes").to_pylist(), image.field("path").to_pylist()))
        elif pa.types.is_binary(image.type) or pa.types.is_large_binary(image.type):  # encoded bytes alone
            images = [(b, None) for b in image.to_pylist()]
        else:
            raise UsageError(f"column {self.image_column!r} of {self.groups.files[i]} holds {image.type}, not encoded "
                             f"images: name the image column with --image_column.")  # fmt: skip
        labels = table.column(self.label_column).to_numpy().astype(np.int64) if self.label_column else None
        return images, labels

    def where(self, row: int) -> str:
        g = int(self.groups.of(np.asarray([row]))[0])
        return f"row {row - int(self.groups.first[g])} of row group {int(self.groups.group[g])} of {self.groups.files[self.groups.file[g]]}"


def decode(reader: Reader, row: int, image: tuple, size: int, augment, seed: int, epoch: int) -> torch.Tensor:
    """uint8 (3, size, size), or the objective's views: the augmentation drawn from (seed, epoch, row), decoded only as
    far as it needs (ssvit.data.decode_item, the per-image path's too)."""
    from ssvit.data import decode_item, item_rng, unreadable

    data, path = image
    try:
        return decode_item(data or Path(path).read_bytes(), augment, item_rng(seed, epoch, row), size)
    except Exception as e:  # noqa: BLE001 - named, with the way out
        raise unreadable(reader.where(row), e) from e


def shuffle_buffer_order(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of `buffer_size` emits items 0..n-1 read in sequence: fill the buffer,
    then each new item replaces a random one, which is emitted; at the end the rest leaves in random order.
    Every item is emitted at most buffer_size - 1 places before it is read, so reading stays sequential."""
    b = min(buffer_size, n)
    buf, out = list(range(b)), []
    for item, slot in zip(range(b, n), rng.integers(0, b, size=n - b).tolist()):
        out.append(buf[slot])
        buf[slot] = item
    return np.asarray(out + [buf[i] for i in rng.permutation(b)], dtype=np.int64)


class ParquetRows(torch.utils.data.Dataset):
    """Map-style view of some rows (global ids, ascending) of RowGroups, for validation, test and few-shot: read
    through a one-row-group cache, so a pass in order reads each row group once."""

    def __init__(self, groups: RowGroups, rows: np.ndarray, labels: torch.Tensor, image_column: str,
                 label_column: Optional[str], size: int):  # fmt: skip
        self.groups, self.rows, self.labels, self.size = groups, np.asarray(rows), labels, size
        self.columns = (image_column, label_column)
        self.augment, self._cached = None, (None, None)

    @cached_property
    def reader(self) -> Reader:
        return Reader(self.groups, *self.columns)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = int(self.rows[index])
        g = int(self.groups.of(np.asarray([row]))[0])
        if self._cached[0] != g:
            self._cached = (g, self.reader.read(g)[0])
        image = self._cached[1][row - int(self.groups.first[g])]
        return {"image": decode(self.reader, row, image, self.size, None, 0, 0), "label": self.labels[index]}

    def subset(self, indices: torch.Tensor) -> "ParquetRows":
        return ParquetRows(self.groups, self.rows[indices.numpy()], self.labels[indices], *self.columns, self.size)

    def augmented(self, augment) -> "ParquetRows":
        if augment is not None:
            raise UsageError("held-out parquet rows are read for evaluation only (no augmentation).")
        return self


class StreamingImages(IterableDataset):
    """The training stream of one process (see the module docstring). Yields {"image", "label", "row"}; a row is
    the image's global id in the shards (the test that no image is lost or repeated reads it)."""

    def __init__(self, groups: RowGroups, train_rows: np.ndarray, labels: Optional[np.ndarray], image_column: str,
                 label_column: Optional[str], size: int, augment, seed: int, buffer_size: int, micro_batch: int,
                 rank: int = 0, world: int = 1):  # fmt: skip
        self.groups, self.train_rows, self.all_labels = groups, np.asarray(train_rows), labels
        self.columns, self.size, self.augment, self.seed = (image_column, label_column), size, augment, seed
        self.buffer_size, self.micro_batch, self.rank, self.world = buffer_size, micro_batch, rank, world
        self.is_train = np.zeros(groups.total, dtype=bool)
        self.is_train[self.train_rows] = True
        self.workers = 1
        # (epoch, micro-batches of this epoch already consumed), in shared memory: persistent DataLoader workers
        # read it at each new iteration (they hold a copy of the dataset made when they started).
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()

    # The sizes every process agrees on, from the metadata alone: each process gets whole row groups, at least
    # its share of the rows less one row group's.
    def rows_per_worker(self, workers: int) -> int:
        return (len(self.train_rows) // self.world - int(self.groups.rows.max()) * (self.world > 1)) // workers

    def batches_per_worker(self, workers: int) -> int:
        return max(self.rows_per_worker(workers), 0) // self.micro_batch

    def set_workers(self, workers: int) -> None:
        self.workers = max(workers, 1)
        if self.batches_per_worker(self.workers) == 0:
            raise UsageError(f"--streaming: {len(self.train_rows):,} training images in {len(self.groups.rows)} row groups "
                             f"(of up to {int(self.groups.rows.max()):,} images) cannot give each of {self.world} process(es) "
                             f"x {self.workers} loader worker(s) whole row groups and a batch of {self.micro_batch}: use fewer "
                             f"--dataloader_num_workers, a smaller --batch_size, or shards with smaller row groups "
                             f"(python -m ssvit.prepare writes 100 images per row group).")  # fmt: skip

    def plan(self) -> dict:
        """What the order of every epoch depends on beyond the config's seed and data (saved with checkpoints)."""
        return {"processes": self.world, "loader_workers": self.workers, "micro_batch": self.micro_batch,
                "shuffle_buffer": self.buffer_size}  # fmt: skip

    def __len__(self) -> int:  # images of this process per epoch
        return self.batches_per_worker(self.workers) * self.workers * self.micro_batch

    def set_position(self, epoch: int, consumed: int) -> None:
        """Start the next iteration at micro-batch `consumed` of `epoch` (0 for a new epoch)."""
        self.position[0], self.position[1] = epoch, consumed

    def worker_rows(self, epoch: int, worker: int) -> np.ndarray:
        """Global row ids worker `worker` of this process reads in `epoch`, in reading order."""
        g = self.groups
        order = np.random.default_rng([self.seed, epoch]).permutation(len(g.rows))
        rows = [r[self.is_train[r]] for r in (np.arange(g.first[i], g.first[i] + g.rows[i]) for i in order)]  # held-out rows are not trained on
        # This process's row groups: a contiguous run of them, cut at the boundaries nearest to its share of rows.
        starts = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
        cut = [int(np.abs(starts - p * len(self.train_rows) / self.world).argmin()) for p in (self.rank, self.rank + 1)]
        mine = np.concatenate(rows[cut[0] : cut[1]] or [np.zeros(0, np.int64)])
        n = self.rows_per_worker(self.workers)
        return mine[worker * n : (worker + 1) * n]

    def __iter__(self):
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.workers:
            raise RuntimeError(f"StreamingImages planned for {self.workers} workers is read by {workers}: call set_workers.")
        epoch, consumed = (int(v) for v in self.position)
        # The DataLoader takes batches from its workers in turn, starting from worker 0 at each new iteration:
        # after `consumed` batches, DataLoader worker i plays the part of logical worker (i + consumed) % W.
        worker = (loader_worker + consumed) % workers
        skip = max(0, -(-(consumed - worker) // workers)) * self.micro_batch  # this worker's batches already consumed
        rows = self.worker_rows(epoch, worker)
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        order = shuffle_buffer_order(len(rows), self.buffer_size, rng)[: self.batches_per_worker(workers) * self.micro_batch]
        yield from self._read(rows, order[skip:], epoch)

    def _read(self, rows: np.ndarray, order: np.ndarray, epoch: int):
        """Yield rows[order[0]], rows[order[1]], ...: the row groups are read in sequence, from the first one
        that holds a row still to come; only rows still to come are kept."""
        if len(order) == 0:
            return
        reader = Reader(self.groups, *self.columns)
        wanted = np.zeros(len(rows), dtype=bool)
        wanted[order] = True
        group_of = self.groups.of(rows)
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(group_of)) + 1, [len(rows)]])  # runs of one row group
        kept, run = {}, int(np.searchsorted(bounds, order.min(), side="right")) - 1
        for pos in order.tolist():
            while pos not in kept:  # read on: the next row group of this worker's rows
                start, end, g = int(bounds[run]), int(bounds[run + 1]), int(group_of[bounds[run]])
                images, labels = reader.read(g)
                for p in np.flatnonzero(wanted[start:end]) + start:
                    local = int(rows[p] - self.groups.first[g])
                    kept[int(p)] = (images[local], -1 if labels is None else int(labels[local]))
                run += 1
            image, label = kept.pop(pos)
            row = int(rows[pos])
            yield {"image": decode(reader, row, image, self.size, self.augment, self.seed, epoch), "label": label, "row": row}

    def augmented(self, augment) -> ParquetRows:
        """Un-augmented training images for few-shot fitting: the rows of whole row groups drawn at random (seed 0)
        until 10,000 (reading 2,000 rows spread over the whole data set would read all of it)."""
        if augment is not None:
            raise UsageError("a streamed training set keeps its augmentation.")
        order = np.random.default_rng(0).permutation(len(self.groups.rows))
        take = order[: int(np.searchsorted(np.cumsum(self.groups.rows[order]), 10_000)) + 1]
        rows = np.concatenate([np.arange(self.groups.first[i], self.groups.first[i] + self.groups.rows[i]) for i in take])
        rows = np.sort(rows[self.is_train[rows]])
        labels = torch.from_numpy(self.all_labels[rows]) if self.all_labels is not None else torch.full((len(rows),), -1)
        return ParquetRows(self.groups, rows, labels, *self.columns, self.size)


def _features(files: list[str]):
    import datasets
    import pyarrow.parquet as pq

    schema = pq.read_schema(files[0])
    if b"huggingface" in (schema.metadata or {}):
        return datasets.Features.from_dict(json.loads(schema.metadata[b"huggingface"])["info"]["features"])
    return datasets.Features.from_arrow_schema(schema)


def _labels(groups: RowGroups, label_column: Optional[str]) -> Optional[np.ndarray]:
    """The whole label column (a small read: parquet stores it apart from the images)."""
    import pyarrow.parquet as pq

    if label_column is None:
        return None
    return np.concatenate([pq.read_table(f, columns=[label_column]).column(0).to_numpy() for f in groups.files]).astype(np.int64)


def streaming_splits(cfg, rank: int, world: int, micro_batch: int, views=None):
    """Splits for --streaming from --data parquet:PATH (a file, a glob or a folder in the hub layout)."""
    from types import SimpleNamespace

    from ssvit.data import SPLIT_PREFIXES, DataSource, Splits, augmentation, columns, held_out_splits, parquet_files

    if DataSource.parse(cfg.data).kind != "parquet":
        raise UsageError(f"--streaming reads parquet shards; --data {cfg.data} is not parquet. Write shards once with "
                         f"`ssvit prepare {cfg.data} --out DIR`, then --data parquet:DIR --streaming.")  # fmt: skip
    if cfg.label_fraction is not None or cfg.samples_per_class is not None:
        raise UsageError("--label_fraction / --samples_per_class draw a subset of a data set in memory: train on "
                         "them without --streaming.")  # fmt: skip
    files = parquet_files(cfg.data)
    groups = RowGroups.scan(files["train"])  # first: a file that is not parquet is named before anything else
    features = _features(files["train"])
    image_col, label_col = columns(SimpleNamespace(features=features), cfg.image_column, cfg.label_column)
    names = [str(n) for n in getattr(features.get(label_col), "names", None) or []]
    labels = _labels(groups, label_col)
    if labels is not None:
        names = names or [str(n) for n in np.unique(labels)]
    # The split map-style data makes (data.held_out_splits), from the label column alone: the same rows for a seed.
    stratify = labels if hasattr(features.get(label_col), "names") else None
    rows, train_rows, how = held_out_splits(stratify, groups.total, cfg, set(files))
    held = {}
    for split in ("validation", "test"):
        if split in files:  # the data's own split, streamed from its files for evaluation
            g = RowGroups.scan(files[split])
            lab = _labels(g, label_col)
            lab = torch.from_numpy(lab) if lab is not None else torch.full((g.total,), -1)
            held[split] = ParquetRows(g, np.arange(g.total), lab, image_col, label_col, cfg.img_size)
            how.append(f"{split}: its {SPLIT_PREFIXES[split][0]} files")
        elif split in rows:  # rows held out of train, read where they lie
            r = np.sort(rows[split])
            lab = torch.from_numpy(labels[r]) if labels is not None else torch.full((len(r),), -1)
            held[split] = ParquetRows(groups, r, lab, image_col, label_col, cfg.img_size)
    train_rows = np.sort(train_rows)
    augment = views or augmentation(cfg.img_size, cfg.crop_scale, cfg.hflip)
    train = StreamingImages(groups, train_rows, labels, image_col, label_col, cfg.img_size, augment, cfg.seed,
                            cfg.shuffle_buffer, micro_batch, rank, world)  # fmt: skip
    if "validation" not in held:
        raise UsageError(f"--data {cfg.data}: --streaming needs a validation split: validation-*.parquet files, or "
                         f"--val_fraction above 0.")  # fmt: skip
    desc = (f"{cfg.data} (streamed, {len(groups.rows):,} row groups in {len(groups.files)} files): {len(train_rows):,} "
            f"train / {len(held['validation']):,} val ({'; '.join(how)})")  # fmt: skip
    if label_col is None:
        desc += "; no labels"
    return Splits(train, held["validation"], len(names), names, desc, held.get("test"))
