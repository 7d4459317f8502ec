"""Frozen-feature evaluation: few-shot linear (ViT paper, section 4.1), linear probe and k-NN.

    python -m ssvit.evaluate --init runs/cifar10_mpp_cpu/checkpoints/step_001500 --data parquet:../shared/data/cifar10/train.parquet

Few-shot: regularised least squares from frozen features to {-1, 1}^K targets, solved in closed form, for
1/5/10/25 images per class and several seeds (mean and spread), as big_vision's fewshot_lsr evaluator does it. Features are extracted in batches and only
the collected (N, D) features enter the solve, so a ViT-B/16 evaluates on CPU within memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from einops import reduce
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


def representation_for(objective: str, requested: str) -> str:
    """auto: the mean of the patch tokens for masked-patch checkpoints (their class token receives no training
    signal: the loss is on patch tokens only), the model's pre-logits (timm's pooled features) otherwise."""
    if requested != "auto":
        return requested
    return "mean" if objective == "masked_patch" else "prelogits"


@torch.no_grad()
def extract_features(backbone, dataset, representation: str, batch_size: int = 256, device="cpu", mean=0.5, std=0.5,
                     limit: Optional[int] = None, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(N, D) float32 features and (N,) labels, streamed in batches (eval mode, no augmentation)."""
    backbone.eval()
    feats, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size)
    seen = 0
    for batch in tqdm(loader, desc=desc, leave=False, mininterval=2):
        images = (batch["image"].to(device).float() / 255 - mean) / std
        if representation == "prelogits":
            f = backbone(images)
        else:
            tokens = backbone.forward_features(images)
            prefix = backbone.num_prefix_tokens
            f = tokens[:, 0] if representation == "cls" else reduce(tokens[:, prefix:], "b n d -> b d", "mean")
        feats.append(f.float().cpu())
        labels.append(batch["label"])
        seen += len(images)
        if limit is not None and seen >= limit:
            break
    return torch.cat(feats), torch.cat(labels)


# Few-shot linear evaluation as the paper's authors run it: big_vision's evaluators/fewshot_lsr.py. Features are
# standardised with the shots' own mean and standard deviation (+1e-5), a constant feature of 100 is appended
# for the bias (regularised like the rest, so at that scale almost not), the targets are {-1, 1}^K, and the
# L2-regularised least-squares problem is solved in closed form: in the primal when there are at least as many
# shots as features, in the dual otherwise. Shots are drawn as big_vision draws them (numpy's default_rng(seed),
# one permutation per class, in class order). Remaining difference: big_vision solves through an eigen-
# decomposition, cached to sweep l2_reg; ssvit solves the same normal equations directly (float64).
FEWSHOT_BIAS = 100.0
FEWSHOT_L2 = 2.0**10  # big_vision's configs


def ridge_fit(x: torch.Tensor, targets: torch.Tensor, l2_reg: float) -> torch.Tensor:
    """argmin_W |x W - targets|^2 + l2_reg |W|^2 in closed form (float64): the primal (x^T x + l2 I)^-1 x^T t
    when x has at least as many rows as columns, else the dual x^T (x x^T + l2 I)^-1 t."""
    x, targets = x.double(), targets.double()
    n, d = x.shape
    if n >= d:
        return torch.linalg.solve(x.T @ x + l2_reg * torch.eye(d, dtype=x.dtype), x.T @ targets)
    return x.T @ torch.linalg.solve(x @ x.T + l2_reg * torch.eye(n, dtype=x.dtype), targets)


def _standardised_with_bias(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = (x.double() - mean) / std
    return torch.cat([x, torch.full((len(x), 1), FEWSHOT_BIAS, dtype=x.dtype)], 1)


def fewshot_indices(train_y: torch.Tensor, shots: int, seed: int, num_classes: int) -> torch.Tensor:
    """`shots` training images of each class, drawn as big_vision draws them."""
    rng = np.random.default_rng(seed)
    labels = train_y.numpy()
    return torch.from_numpy(np.concatenate([rng.permutation(np.where(labels == c)[0])[:shots] for c in range(num_classes)]))


def fewshot_accuracy(train_x, train_y, val_x, val_y, shots: int, seed: int, num_classes: int, l2_reg: float = FEWSHOT_L2) -> float:
    """Fit {-1, 1}^K targets on `shots` images per class in closed form; top-1 accuracy on (val_x, val_y)."""
    idx = fewshot_indices(train_y, shots, seed, num_classes)
    x = train_x[idx].double()
    mean, std = x.mean(0, keepdim=True), x.std(0, unbiased=False, keepdim=True) + 1e-5  # the shots' statistics only
    targets = F.one_hot(train_y[idx], num_classes).double() * 2 - 1
    w = ridge_fit(_standardised_with_bias(x, mean, std), targets, l2_reg)
    return (_standardised_with_bias(val_x, mean, std) @ w).argmax(1).eq(val_y).double().mean().item()


def fewshot(train_x, train_y, val_x, val_y, num_classes, shots=(1, 5, 10, 25), seeds=(0, 1, 2), l2_reg=FEWSHOT_L2) -> dict:
    out = {}
    for n in shots:
        accs = torch.tensor([fewshot_accuracy(train_x, train_y, val_x, val_y, n, s, num_classes, l2_reg) for s in seeds])
        out[f"fewshot_{n}shot"] = accs.mean().item()
        out[f"fewshot_{n}shot_std"] = accs.std(unbiased=False).item()
    return out


def linear_probe(train_x, train_y, val_x, val_y, num_classes, epochs: int = 200, weight_decay: float = 1e-4) -> float:
    """Multinomial logistic regression on standardised frozen features (full-batch L-BFGS)."""
    mu, sd = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    xt, xv = (train_x - mu) / sd, (val_x - mu) / sd
    head = torch.nn.Linear(xt.shape[1], num_classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=epochs, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(xt), train_y) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (head(xv).argmax(1) == val_y).float().mean().item()


def knn_accuracy(train_x, train_y, val_x, val_y, num_classes, k: int = 20) -> float:
    """Cosine k-nearest-neighbour vote."""
    tx, vx = F.normalize(train_x, dim=1), F.normalize(val_x, dim=1)
    correct = 0
    for chunk, labels in zip(vx.split(1024), val_y.split(1024)):
        top = (chunk @ tx.T).topk(k, dim=1).indices
        votes = F.one_hot(train_y[top], num_classes).sum(1)
        correct += (votes.argmax(1) == labels).sum().item()
    return correct / len(val_y)


def evaluate_backbone(backbone, splits, representation: str, shots=(1, 5, 10, 25), seeds=(0, 1, 2), probe=True,
                      max_train: Optional[int] = 10_000, device="cpu", batch_size: int = 256) -> dict:  # fmt: skip
    """All frozen-feature metrics on splits.val, fitted on (at most max_train) un-augmented training images."""
    cfg = getattr(backbone, "pretrained_cfg", {}) or {}
    mean = torch.tensor(cfg.get("mean", (0.5,) * 3), device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.5,) * 3), device=device).view(1, 3, 1, 1)
    train = splits.train.augmented(None)  # features of the images as stored, not augmented
    if max_train is not None and len(train) > max_train:
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:max_train].sort().values)
    tx, ty = extract_features(backbone, train, representation, batch_size, device, mean, std, desc="train features")
    vx, vy = extract_features(backbone, splits.val, representation, batch_size, device, mean, std, desc="val features")
    k = splits.num_classes
    result = {"representation": representation, "train_images": len(ty), "val_images": len(vy)}
    result |= fewshot(tx, ty, vx, vy, k, shots, seeds)
    if probe:
        result["linear_probe"] = linear_probe(tx, ty, vx, vy, k)
        result["knn20"] = knn_accuracy(tx, ty, vx, vy, k)
    return result


def format_table(result: dict) -> str:
    rows = [("metric", "value")]
    for key, value in result.items():
        if key.endswith("_std"):
            continue
        if isinstance(value, float):
            std = result.get(f"{key}_std")
            value = f"{value:.4f}" + (f" ± {std:.4f}" if std is not None else "")
        rows.append((key, str(value)))
    lines = [f"| {a} | {b} |" for a, b in rows]
    lines.insert(1, "|---|---|")
    return "\n".join(lines)


def run_command(argv=None) -> dict:
    from ssvit.config import TrainConfig, saved_train_config
    from ssvit.data import load_splits
    from ssvit.models import create_backbone, load_init
    from ssvit.train import cpu_has_bf16

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", required=True, help="ssvit checkpoint folder, or timm:<name> (with --img_size and --data)")
    p.add_argument("--img_size", type=int, default=None, help="with timm:<name> (default 224)")
    p.add_argument("--data", default=None, help="as in pretraining (default: the checkpoint's own data)")
    p.add_argument("--representation", default="auto", choices=["auto", "cls", "mean", "prelogits"])
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 25])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max_train", type=int, default=10_000, help="training images for probe and k-NN")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--bf16", action="store_true", help="extract features under bf16 autocast")
    p.add_argument("--output", default=None, help="JSON file (default: evaluation.json beside the checkpoint)")
    p.add_argument("--random_init", action="store_true",
                   help="evaluate the checkpoint's architecture at random initialisation: the no-pretraining reference")  # fmt: skip
    args = p.parse_args(argv)

    if args.init.startswith("timm:"):  # a timm model: its pretrained weights, or --random_init
        cfg = TrainConfig(objective="supervised", model=args.init[5:], model_kwargs={}, img_size=args.img_size or 224)
    else:
        cfg = saved_train_config(args.init)
    if args.data:
        cfg.data = args.data
    torch.manual_seed(0)  # a reproducible random initialisation for --random_init
    backbone = create_backbone(cfg.model, cfg.img_size, cfg.model_kwargs)
    if not args.random_init:
        load_init(backbone, args.init)
    splits = load_splits(cfg)
    rep = representation_for(cfg.objective, args.representation)
    result = {"checkpoint": "random initialisation" if args.random_init else str(args.init), "data": splits.description}
    start = time.perf_counter()
    if args.bf16 and not cpu_has_bf16():
        print("This CPU has no bf16 matrix units: --bf16 would be hundreds of times slower here; extracting in fp32.")
        args.bf16 = False
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        result |= evaluate_backbone(backbone, splits, rep, tuple(args.shots), tuple(range(args.seeds)),
                                    max_train=args.max_train, batch_size=args.batch_size)  # fmt: skip
    result["seconds"] = time.perf_counter() - start
    result["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    init = Path(args.init)
    name = "evaluation_random_init.json" if args.random_init else "evaluation.json"
    folder = Path(".") if args.init.startswith("timm:") else (init if init.is_dir() else init.parent)
    out = Path(args.output) if args.output else folder / name
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(format_table(result) + "\n")
    print(format_table(result))
    print(f"\nWritten: {out} and {out.with_suffix('.md')}")
    return result


def main(argv=None):
    from ssvit.errors import user_errors

    with user_errors("ssvit-evaluate", cli=argv is None):
        return run_command(argv)


if __name__ == "__main__":
    main()
