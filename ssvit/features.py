"""Frozen-feature evaluation: few-shot linear (ViT paper, section 4.1, as big_vision computes it), linear probe
and k-NN. The library behind ``python -m ssvit.evaluate`` and the loop's few-shot evaluator (ssvit/evals.py).

Features are extracted in batches and only the collected (N, D) features enter the solves, so a ViT-B/16
evaluates on CPU within memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from einops import reduce
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


def representation_for(objective: Optional[str], requested: str) -> str:
    """auto: the representation the objective that trained the weights names (the mean patch token for objectives
    whose class token gets no training signal, such as masked patch), the model's pre-logits (timm's pooled features)
    otherwise, and for weights no ssvit objective trained (objective None: timm's own)."""
    from ssvit import objectives

    if requested != "auto":
        return requested
    source = objectives.OBJECTIVES.get(objective)
    return source.representation if source is not None else "prelogits"


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


# The same read-out on every labelled image a run has (budget studies' lsq arms): no shots to draw and no labels
# beyond those images, so L2 is chosen by leave-one-out accuracy on them, for the whole grid from one eigen-
# decomposition of the Gram matrix a^T a = V diag(e) V^T of the standardised features a (e = s^2 of a = U S V^T): the
# fit's predictions are H t with the hat matrix H = (a V) diag(1 / (e + l2)) (a V)^T, and leaving image i out predicts
# (H t)_i - h_ii t_i over 1 - h_ii (the PRESS identity; the standardisation stays that of all the images). Beside the
# features themselves, only (D, D) and (D, K) sums and `chunk` rows at a time are held in float64, not n x D copies.
LSQ_L2_GRID = tuple(2.0**k for k in range(-4, 17))


@dataclass
class LsqReadout:
    """Regularised least squares to {-1, 1}^K targets on standardised features (the few-shot read-out above), L2
    chosen from `grid` by leave-one-out accuracy on the training images (ties: the stronger L2)."""

    mean: torch.Tensor
    std: torch.Tensor
    weights: torch.Tensor
    l2_reg: float
    loo_accuracies: list[float]

    @classmethod
    def fit(cls, x: torch.Tensor, labels: torch.Tensor, num_classes: int, grid=LSQ_L2_GRID, chunk: int = 65_536) -> "LsqReadout":
        n = len(x)
        rows = lambda: ((x[i : i + chunk].double(), labels[i : i + chunk]) for i in range(0, n, chunk))  # noqa: E731
        mean = sum(c.sum(0, keepdim=True) for c, _ in rows()) / n
        std = (sum((c - mean).square().sum(0, keepdim=True) for c, _ in rows()) / n).sqrt() + 1e-5
        gram, moment = 0, 0  # a^T a and a^T t
        for c, y in rows():
            a, t = _standardised_with_bias(c, mean, std), F.one_hot(y, num_classes).double() * 2 - 1
            gram, moment = gram + a.T @ a, moment + a.T @ t
        e, v = torch.linalg.eigh(gram)
        projected = v.T @ moment
        inverse = [1 / (e + l2) for l2 in grid]
        correct = [0] * len(grid)
        for c, y in rows():
            b, t = _standardised_with_bias(c, mean, std) @ v, F.one_hot(y, num_classes).double() * 2 - 1
            squared = b.square()
            for k, inv in enumerate(inverse):
                hat = (squared @ inv)[:, None]
                left_out = (b @ (inv[:, None] * projected) - hat * t) / (1 - hat).clamp_min(1e-12)
                correct[k] += left_out.argmax(1).eq(y).sum().item()
        accuracies = [c / n for c in correct]
        best = max(zip(accuracies, grid))[1]
        weights = torch.linalg.solve(gram + best * torch.eye(len(gram), dtype=gram.dtype), moment)  # ridge_fit's primal
        return cls(mean, std, weights, best, accuracies)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return (_standardised_with_bias(x, self.mean, self.std) @ self.weights).argmax(1)


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


def knn_accuracy(train_x, train_y, val_x, val_y, num_classes, k: int = 20, temperature: Optional[float] = None) -> float:
    """Cosine k-nearest-neighbour vote: one vote per neighbour, or with a temperature each neighbour's vote weighted
    by exp(similarity / temperature), as DINO evaluates (Caron et al., 2021, section 4.1; eval_knn.py: 20 neighbours,
    temperature 0.07)."""
    tx, vx = F.normalize(train_x, dim=1), F.normalize(val_x, dim=1)
    correct = 0
    for chunk, labels in zip(vx.split(1024), val_y.split(1024)):
        similarity, top = (chunk @ tx.T).topk(min(k, len(tx)), dim=1)
        weights = torch.ones_like(similarity) if temperature is None else (similarity / temperature).exp()
        votes = (F.one_hot(train_y[top], num_classes) * weights[..., None]).sum(1)
        correct += (votes.argmax(1) == labels).sum().item()
    return correct / len(val_y)


def normalisation(backbone, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The (mean, std) the backbone's pretrained_cfg names for its inputs, (0.5, 0.5) per channel by default."""
    cfg = getattr(backbone, "pretrained_cfg", {}) or {}
    return tuple(torch.tensor(cfg.get(k, (0.5,) * 3), device=device).view(1, 3, 1, 1) for k in ("mean", "std"))


def evaluate_lsq(backbone, splits, representation: str, device="cpu", batch_size: int = 256) -> dict:
    """LsqReadout fitted on every (un-augmented) training image of `splits`, top-1 on validation and, where there is
    one, on test."""
    mean, std = normalisation(backbone, device)
    features = {name: extract_features(backbone, data, representation, batch_size, device, mean, std, desc=f"{name} features")
                for name, data in (("train", splits.train.augmented(None)), ("val", splits.val), ("test", splits.test)) if data is not None}  # fmt: skip
    readout = LsqReadout.fit(*features["train"], splits.num_classes)
    scores = {f"{name}/top1": readout.predict(x).eq(y).double().mean().item() for name, (x, y) in features.items() if name != "train"}
    return {**scores, "labelled_images": len(features["train"][1]), "l2_reg": readout.l2_reg, "loo_top1": max(readout.loo_accuracies)}


def evaluate_backbone(backbone, splits, representation: str, shots=(1, 5, 10, 25), seeds=(0, 1, 2), probe=True,
                      max_train: Optional[int] = 10_000, device="cpu", batch_size: int = 256, lsq: bool = False) -> dict:  # fmt: skip
    """All frozen-feature metrics on splits.val, fitted on (at most max_train) un-augmented training images; with
    lsq also LsqReadout (every one of those images, L2 by leave-one-out)."""
    mean, std = normalisation(backbone, device)
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
    result["knn20_weighted"] = knn_accuracy(tx, ty, vx, vy, k, temperature=0.07)  # DINO's k-NN
    if lsq:
        readout = LsqReadout.fit(tx, ty, k)
        result |= {"lsq": readout.predict(vx).eq(vy).double().mean().item(), "lsq_l2_reg": readout.l2_reg}
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
