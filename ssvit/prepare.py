"""Prepare a data set once: image folder (or any --data source) to parquet shards in the Hugging Face layout.

    ssvit prepare imagefolder:/data/imagenet --out /data/imagenet-shards --max_side 320
    accelerate launch ssvit/pretrain.py --data parquet:/data/imagenet-shards ...

What is written, and how: ssvit/shards.py.
"""

from __future__ import annotations

from pathlib import Path

from ssvit.cli import make_parser, parse_args
from ssvit.errors import command
from ssvit.shards import prepare


def run_command(argv=None) -> dict:
    p = make_parser("ssvit-prepare", __doc__)
    p.add_argument("source", help="imagefolder:DIR, parquet:PATH, or any --data source")
    p.add_argument("--out", required=True, help="the folder to write the shards to")
    p.add_argument("--max_side", type=int, default=None, help="re-encode so that the shorter side is at most N px")
    p.add_argument("--shard_mb", type=float, default=256, help="target shard size in MiB")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    p.add_argument("--seed", type=int, default=0, help="seed of the order the rows are written in (shuffled)")
    p.add_argument("--image_column", default=None, help="the source's image column (default: its Image feature)")
    p.add_argument("--label_column", default=None, help="the source's label column (default: its ClassLabel, or 'label')")
    args = parse_args(p, argv)
    summary = prepare(args.source, args.out, args.max_side, args.shard_mb, args.workers, args.quality, seed=args.seed,
                      image_column=args.image_column, label_column=args.label_column)  # fmt: skip
    print(f"Written: {summary['written']} images; refused: {summary['refused']} (see {Path(args.out) / 'refused.txt'}).")
    print(f"Train on it: accelerate launch ssvit/pretrain.py --data parquet:{args.out}")
    return summary


main = command("ssvit-prepare")(run_command)


if __name__ == "__main__":
    main()
