"""Masked patch prediction: the ViT paper's self-supervised objective (Dosovitskiy et al., 2021, App. B.1.2).

Half of the patch embeddings are corrupted; of those, 80% become a learnable [mask] embedding, 10% a random
other patch embedding and 10% stay unchanged (BERT's recipe carried over to patches). From each corrupted
patch's output token the model predicts the patch's 3-bit mean colour: 8 levels per RGB channel, 512 classes.
The paper also tried 16 parallel 3-bit predictions of a 4x4 downsized patch and L2 regression on the full
patch (``target``), and a 15% corruption rate, which was slightly worse (``mask_ratio``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
import torchmetrics
from einops import rearrange, reduce, repeat
from torch import nn

from ssvit.objectives import register
from ssvit.objectives.base import Objective, PatchTokens, StepOutput, mlp_tanh_head, token_geometry
from ssvit.errors import UsageError, check_ranges


def quantize(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Values in [0, 1] to 2**bits equal bins: [0, 1/8) -> 0, [1/8, 2/8) -> 1, ..., [7/8, 1.0] -> 7 for 3 bits."""
    levels = 2**bits
    return (values * levels).floor().clamp_(0, levels - 1).long()


def color_class(rgb: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., 3) RGB in [0, 1] -> class r * L**2 + g * L + b with L = 2**bits levels (512 classes at 3 bits)."""
    q = quantize(rgb, bits)
    levels = 2**bits
    return (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]


def class_color(classes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of color_class up to quantisation: class -> (..., 3) bin-centre RGB in [0, 1]."""
    levels = 2**bits
    rgb = torch.stack([classes // levels**2, (classes // levels) % levels, classes % levels], dim=-1)
    return (rgb.float() + 0.5) / levels


def patch_targets(images: torch.Tensor, patch: int, target: str, bits: int = 3, grid: int = 4) -> torch.Tensor:
    """Targets per patch from images in [0, 1] (before normalisation).

    mean_color: (B, N) classes; downsampled: (B, N, grid*grid) classes; pixels: (B, N, patch*patch*3) values.
    """
    if target == "mean_color":
        return color_class(reduce(images, "b c (h p1) (w p2) -> b (h w) c", "mean", p1=patch, p2=patch), bits)
    if target == "downsampled":
        if patch % grid:
            raise UsageError(f"target=downsampled needs the patch size ({patch}px) to be a multiple of grid={grid}")
        cells = reduce(
            images, "b c (h g1 q1) (w g2 q2) -> b (h w) (g1 g2) c", "mean", g1=grid, g2=grid, q1=patch // grid, q2=patch // grid
        )
        return color_class(cells, bits)
    if target == "pixels":
        return rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch)
    raise ValueError(f"Unknown target {target!r}: use mean_color, downsampled or pixels")


def corrupt(
    tokens: torch.Tensor, mask_token: torch.Tensor, ratio: float, mask_prob: float, random_prob: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corrupt patch embeddings (B, N, D) as in App. B.1.2. Returns (tokens, selected (B, N), kind (B, N),
    positions (B, k)): positions are the k selected patches of each image in ascending order, for gathering
    without boolean indexing (which would wait for the GPU to learn the result's size).

    Exactly k = round(ratio * N) patches per image are selected. Each selected patch independently becomes the
    [mask] embedding (mask_prob), a random other patch embedding (random_prob) or stays unchanged (the rest);
    kind is 0 unselected, 1 mask, 2 random, 3 unchanged. Unselected tokens are returned bit-identical.

    The "random other patch" is drawn uniformly from all other patch embeddings of the local batch, other
    images included: the analogue of BERT's random vocabulary token, i.e. a sample from the distribution of
    patch embeddings. Drawing only from the same image would hand the model that image's colours, and the
    replacement would be a weaker corruption. It is never the patch itself.
    """
    b, n, _ = tokens.shape
    k = round(ratio * n)
    picked = torch.rand(b, n, device=tokens.device).topk(k, dim=1).indices
    selected = torch.zeros(b, n, dtype=torch.bool, device=tokens.device).scatter_(1, picked, True)
    u = torch.rand(b, n, device=tokens.device)
    to_mask = selected & (u < mask_prob)
    to_random = selected & (u >= mask_prob) & (u < mask_prob + random_prob)

    flat = rearrange(tokens, "b n d -> (b n) d")
    own = torch.arange(b * n, device=tokens.device).view(b, n)
    other = torch.randint(0, max(b * n - 1, 1), (b, n), device=tokens.device)
    other = other + (other >= own)  # skip the patch itself
    out = torch.where(to_mask[..., None], mask_token.to(tokens.dtype), tokens)
    out = torch.where(to_random[..., None], flat[other.clamp_(max=b * n - 1)], out)
    kind = selected.long() + to_random.long() + 2 * (selected & ~to_mask & ~to_random).long()
    return out, selected, kind, picked.sort(dim=1).values


def take(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B, N, ...) at positions (B, k): (B, k, ...)."""
    return x.gather(1, positions.view(*positions.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:]))


class ColorCounts(torchmetrics.Metric):
    """How often each colour class occurs among the training patches: the majority-class baseline. Saved in
    checkpoints (persistent), so the baseline survives a resume."""

    full_state_update = False

    def __init__(self, num_classes: int):
        super().__init__()
        self.add_state("counts", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum", persistent=True)

    def update(self, classes: torch.Tensor) -> None:
        self.counts += torch.bincount(classes.flatten(), minlength=len(self.counts))

    def compute(self) -> torch.Tensor:
        return self.counts


@register("masked_patch")
class MaskedPatch(Objective):
    best_metric = "color_accuracy"
    needs_labels = False

    @dataclass
    class Options:
        mask_ratio: float = 0.5
        """Share of patches corrupted per image (paper: 50%; 15% was slightly worse)."""
        mask_token_prob: float = 0.8
        """Of the corrupted patches: share replaced by the learnable [mask] embedding."""
        random_patch_prob: float = 0.1
        """Of the corrupted patches: share replaced by a random other patch embedding (the rest stay unchanged)."""
        target: Literal["mean_color", "downsampled", "pixels"] = "mean_color"
        bits: int = 3
        """Colour bit depth per channel for mean_color and downsampled targets (paper: 3, i.e. 512 classes)."""
        grid: int = 4
        """Cells per side of the downsampled target (paper: 4x4, 16 parallel predictions)."""
        head: Literal["mlp_tanh", "linear"] = "mlp_tanh"
        """Prediction head on each corrupted output token: an MLP with one tanh hidden layer (the form of the
        paper's pretraining head, section 3.1), or linear."""
        mosaic_images: int = 8
        """Validation images in the PNG written at each evaluation (0: none)."""

    # The paper does not specify the masked-patch head. We default to the form of its pretraining head (an MLP
    # with one tanh hidden layer, section 3.1), so the backbone/head boundary is the same in supervised and
    # masked-patch pretraining, and fine-tuning drops the head in both cases. A linear head puts more
    # colour-specific work into the last blocks; `head: linear` is there to compare.

    @classmethod
    def check_options(cls, cfg, options: Options) -> None:
        o = options
        geometry = token_geometry(cfg)  # None for BiT: PatchTokens refuses it when the objective is built
        n = geometry[1][0] * geometry[1][1] if geometry else None
        check_ranges([
            ("mask_ratio", o.mask_ratio, 0 < o.mask_ratio <= 1, "in (0, 1], the share of patches corrupted (paper: 0.5)"),
            ("mask_ratio", o.mask_ratio, not 0 < o.mask_ratio <= 1 or n is None or round(o.mask_ratio * n) >= 1,
             f"high enough to corrupt a patch: round({o.mask_ratio} x {n}) = 0 of the {n} patches of an image at --img_size "
             f"{cfg.img_size} with {geometry and geometry[0]}-px patches"),
            ("mask_token_prob", o.mask_token_prob, o.mask_token_prob >= 0, "0 or more (paper: 0.8)"),
            ("random_patch_prob", o.random_patch_prob, o.random_patch_prob >= 0 and o.mask_token_prob + o.random_patch_prob <= 1,
             f"0 or more, and at most 1 with --masked_patch.mask_token_prob {o.mask_token_prob} (paper: 0.1 and 0.8)"),
            ("bits", o.bits, 1 <= o.bits <= 8, "1 to 8 bits per channel (paper: 3, i.e. 512 colour classes)"),
            ("grid", o.grid, o.grid >= 1, "1 or more cells per side (paper: 4)"),
            ("mosaic_images", o.mosaic_images, o.mosaic_images >= 0, "0 (no figure) or more images"),
        ], "--masked_patch.")  # fmt: skip

    representation = "mean"  # the loss is on patch tokens only: the class token gets no training signal
    classifier_pooling = {"global_pool": "avg", "fc_norm": False}
    """A classifier reads the mean patch token (after the final norm, so the checkpoint's weights fit): masked patch
    prediction trains the patch tokens' outputs, never the class token's (App. B.1.2); on validation, fine-tuning
    read the mean patch token better (docs/studies.md, "Which token fine-tuning reads")."""

    def __init__(self, backbone: nn.Module, num_classes: int, options: Options):
        super().__init__(backbone, num_classes, options)
        self.tokens = PatchTokens(backbone, "masked_patch")
        o = options  # checked at start-up (check_options)
        dim = backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.classes = (2**o.bits) ** 3
        self.patch = self.tokens.patch
        out_dim = {"mean_color": self.classes, "downsampled": o.grid**2 * self.classes, "pixels": self.patch**2 * 3}[o.target]
        self.head = mlp_tanh_head(dim, out_dim) if o.head == "mlp_tanh" else nn.Linear(dim, out_dim)
        last = self.head[-1] if isinstance(self.head, nn.Sequential) else self.head
        nn.init.trunc_normal_(last.weight, std=0.02)
        nn.init.zeros_(last.bias)
        self.train_colors = ColorCounts(self.classes)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the backbone with corrupted patch embeddings: (patch tokens (B, N, D), selected (B, N), positions (B, k)).
        The embeddings are corrupted before position embeddings are added: the position of a corrupted patch stays
        known (App. B.1.2 corrupts "patch embeddings")."""
        o = self.options
        patches = self.tokens.embed(self.normalize(images))
        patches, selected, _, positions = corrupt(patches, self.mask_token, o.mask_ratio, o.mask_token_prob, o.random_patch_prob)
        tokens = self.tokens.encode(patches + self.tokens.positions())
        return tokens[:, self.tokens.num_prefix :], selected, positions

    def _loss_and_color(self, pred: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss, averaged over the corrupted patches, and the predicted mean-colour class of each (B, k)."""
        o = self.options
        if o.target == "mean_color":
            return F.cross_entropy(rearrange(pred, "b k c -> (b k) c"), targets.flatten()), pred.argmax(-1)
        if o.target == "downsampled":
            logits = rearrange(pred, "b k (g c) -> (b k g) c", c=self.classes)
            cells = class_color(rearrange(logits.argmax(-1), "(b k g) -> b k g", b=len(pred), g=o.grid**2), o.bits)
            return F.cross_entropy(logits, targets.flatten()), color_class(cells.mean(-2), o.bits)
        return F.mse_loss(pred, targets), color_class(reduce(pred.clamp(0, 1), "b k (p c) -> b k c", "mean", c=3), o.bits)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> StepOutput:
        o = self.options
        tokens, selected, positions = self.encode(images)
        pred = self.head(take(tokens, positions)).float()
        patch_rgb = reduce(images, "b c (h p1) (w p2) -> b (h w) c", "mean", p1=self.patch, p2=self.patch)
        colors = color_class(patch_rgb, o.bits)  # (B, N): the mean-colour class of every patch
        targets = colors if o.target == "mean_color" else patch_targets(images, self.patch, o.target, o.bits, o.grid)
        loss, predicted = self._loss_and_color(pred, take(targets, positions))
        true = take(colors, positions)
        correct = (predicted == true).float()
        # Per image, for metrics: the batch's loss (every image has k corrupted patches, so averaging it over
        # images weighs every patch the same, as the loss does), and which corrupted patches it got right.
        outputs = {"loss": loss.detach().expand(len(images)), "correct": correct, "colors": colors}
        if not self.training:
            # No-learning baselines, printed beside the model: (1) the most frequent colour class of the training
            # patches this process saw; (2) per image, the colour class of the mean of its uncorrupted patches.
            keep = (~selected).float()[..., None]
            context = color_class((patch_rgb * keep).sum(1) / keep.sum(1).clamp(min=1), o.bits)
            outputs |= {"majority_hit": (true == self.train_colors.counts.argmax()).float(),
                        "context_hit": (true == context[:, None]).float(), "predicted": predicted, "positions": positions}  # fmt: skip
        return StepOutput(loss, {"color_accuracy": correct.mean()}, outputs)

    def on_train_step(self, out: StepOutput) -> None:
        self.train_colors.update(out.outputs["colors"])

    def make_metrics(self) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection(
            {name: torchmetrics.MeanMetric() for name in ("loss", "color_accuracy", "baseline_majority", "baseline_context_mean")}
        )

    def update_metrics(self, metrics, outputs: dict[str, torch.Tensor]) -> None:
        # Every corrupted patch weighs the same (k per image), as in the training loss.
        metrics["loss"].update(outputs["loss"])
        metrics["color_accuracy"].update(outputs["correct"])
        metrics["baseline_majority"].update(outputs["majority_hit"])
        metrics["baseline_context_mean"].update(outputs["context_hit"])

    @torch.no_grad()
    def on_evaluate(self, images: torch.Tensor, out_dir: Path, step: int) -> Optional[Path]:
        """A mosaic: per row, the image | its true mean-colour patches | the model's colours on the corrupted
        patches (uncorrupted patches shown at their true colour, darkened)."""
        from torchvision.utils import save_image

        images = images[: self.options.mosaic_images]
        if len(images) == 0:
            return None
        out = self(images).outputs
        bits, side, patch = self.options.bits, images.shape[-1] // self.patch, self.patch
        true = class_color(out["colors"], bits)
        shown = (true * 0.35).scatter(1, out["positions"][..., None].expand(-1, -1, 3), class_color(out["predicted"], bits))
        tiles = [repeat(c, "b (h w) c -> b c (h p1) (w p2)", h=side, p1=patch, p2=patch) for c in (true, shown)]
        rows = rearrange([images.float(), *tiles], "t b c h w -> (b t) c h w")
        rows = F.interpolate(rows, scale_factor=max(1, 96 // images.shape[-1]), mode="nearest")
        path = out_dir / f"masked_patch_step{step:06d}.png"
        save_image(rows, path, nrow=3, padding=2, pad_value=1.0)
        return path
