"""The objective interface: what one training signal owns (head, extra parameters, targets, loss, metrics).

The backbone is a plain timm model created with ``num_classes=0`` and knows nothing of the objective, so
exporting a backbone is exporting that timm model (``objective.backbone``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from einops import rearrange
from torch import nn

from ssvit.errors import UsageError

if TYPE_CHECKING:
    from ssvit.data import Views


@dataclass
class StepOutput:
    loss: torch.Tensor
    """Scalar training loss."""
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached scalar tensors to log (no .item() here: the loop syncs only at log intervals)."""
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-image tensors (batch dimension first) from which update_metrics scores the step; in evaluation the
    loop gathers them from every process (accelerator.gather_for_metrics) before update_metrics sees them."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached values of a training step for the objective's own on_train_step (e.g. DINO's teacher outputs, which
    move its centre): neither logged nor gathered."""


def mlp_tanh_head(dim: int, out_dim: int, hidden_dim: Optional[int] = None) -> nn.Sequential:
    """The ViT paper's pretraining head: an MLP with one tanh hidden layer (section 3.1)."""
    hidden_dim = hidden_dim or dim
    return nn.Sequential(nn.Linear(dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, out_dim))


def token_geometry(cfg) -> Optional[tuple[int, tuple[int, int]]]:
    """(pixels per token side, token grid) of the run's backbone, read from the timm model itself, built on the meta
    device (no weights, no memory; 40 to 300 ms), so that options can be checked against it before any work. None for
    a model without patch tokens (BiT), or one timm cannot build as given (building the run names the problem)."""
    import timm

    try:
        with torch.device("meta"):
            backbone = timm.create_model(cfg.model, **{**(cfg.model_kwargs or {}), "num_classes": 0, "img_size": cfg.img_size})
    except Exception:  # noqa: BLE001 - no img_size argument (BiT), an unknown name or keyword: ssvit.models says which
        return None
    embed = getattr(backbone, "patch_embed", None)
    if embed is None or not hasattr(embed, "grid_size"):
        return None
    grid = tuple(embed.grid_size)
    return embed.img_size[0] // grid[0], grid  # a hybrid's patch_embed works on CNN features: pixels over the grid


class PatchTokens:
    """The token-level view of a timm VisionTransformer (hybrid R50+ViT included) that patch objectives share, made
    of the backbone's public modules only, so that the backbone stays a plain timm model that exports unchanged:

        embed(images)        patch embeddings (B, N, D), before position embeddings (patch_embed)
        positions()          the patches' position embeddings (1, N, D) (pos_embed without the prefix's)
        encode(tokens)       prefix tokens (class, registers) with theirs, then pos_drop, patch_drop, norm_pre,
                             blocks, norm: (B, P + M, D) for any M tokens, e.g. only the visible ones (MAE)

    ``encode(embed(x) + positions())`` is ``backbone.forward_features(x)`` bit for bit (tested); between the two an
    objective replaces (masked patch, SimMIM) or drops (MAE) tokens.
    """

    def __init__(self, backbone: nn.Module, objective: str):
        embed = getattr(backbone, "patch_embed", None)
        if embed is None or not hasattr(embed, "grid_size") or getattr(backbone, "pos_embed", None) is None or not hasattr(backbone, "blocks"):
            raise UsageError(
                f"{objective} needs a model with patch tokens (a timm VisionTransformer or a hybrid R50+ViT); "
                f"{type(backbone).__name__} has none (BiT/ResNet models are convolutional). "
                f"Use --objective supervised for it, or a ViT such as --model vit_tiny_patch16_224."
            )
        if getattr(backbone, "dynamic_img_size", False):
            raise UsageError(f"{objective} needs a fixed token grid: remove dynamic_img_size from --model_kwargs.")
        self.backbone = backbone
        self.num_prefix = backbone.num_prefix_tokens
        self.grid = tuple(embed.grid_size)
        # Pixels per token side: image size over the token grid (a hybrid's patch_embed works on CNN features, so
        # its own patch_size is not the pixel size).
        self.patch = embed.img_size[0] // self.grid[0]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.patch_embed(images)

    def positions(self) -> torch.Tensor:
        vit = self.backbone
        return vit.pos_embed if vit.no_embed_class else vit.pos_embed[:, self.num_prefix :]

    def prefix(self, batch: int) -> Optional[torch.Tensor]:
        vit = self.backbone
        tokens = [t.expand(batch, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if not tokens:
            return None
        tokens = torch.cat(tokens, dim=1)
        return tokens if vit.no_embed_class else tokens + vit.pos_embed[:, : self.num_prefix]

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        vit, prefix = self.backbone, self.prefix(len(tokens))
        x = tokens if prefix is None else torch.cat([prefix, tokens], dim=1)
        x = vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))
        return vit.norm(vit.blocks(x))


@dataclass(frozen=True)
class Unlabeled:
    """A second stream of training images an objective draws beside the labelled batch (Objective.unlabeled): every
    training image, labels unused, as `views`, `ratio` times the labelled batch (FixMatch's mu)."""

    views: "Views"
    ratio: int


@dataclass
class Progress:
    """Where training is, handed to Objective.on_optimizer_step after every optimizer step."""

    step: int
    """Optimizer steps done (1 after the first)."""
    max_steps: int
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    """The run's optimizer, for schedules the objective owns (e.g. DINO's weight decay)."""


class Objective(nn.Module):
    """Wraps a timm backbone. ``forward(images, labels)`` takes images in [0, 1] (a tensor, or a list of tensors, one
    per view, for an objective with views) and returns a StepOutput; it has no side effects (the loop also calls it to
    check a checkpoint and to evaluate): state kept over training (a momentum teacher, a centre) changes only in
    on_train_step (after every forward of training) and on_optimizer_step (after every optimizer step).

    One path computes predictions and loss (forward); validation metrics are updated from its outputs. What the rest
    of ssvit needs to know of an objective is a class attribute here, never its name."""

    name: str = ""
    """The name it is registered under (set by register): its options are --<name>.<option>."""
    best_metric: Optional[str] = None
    """Validation metric (higher is better) that selects the best checkpoint, e.g. "top1"."""
    needs_labels: bool = True
    """False for self-supervised objectives: they train on images without labels."""
    representation: str = "prelogits"
    """The frozen features few-shot, probe and k-NN evaluation read under --fewshot_representation auto: prelogits
    (timm's pooled features), cls (the class token) or mean (the mean patch token)."""
    classifier_pooling: dict = {}
    """model_kwargs of a classifier fine-tuned from this objective's backbone, unless --model_kwargs chooses a
    pooling: e.g. the mean patch token for objectives that never train the class token."""

    @classmethod
    def released_prefix(cls) -> str:
        """Where, in this objective's checkpoints, the backbone it releases is: the prefix of its state-dict keys. Export,
        fine-tuning and frozen evaluation take those weights: the trained backbone's ("backbone."), or e.g. a momentum
        teacher's copy of it (DINO releases its teacher); --checkpoint_key (export, evaluate) and --init_checkpoint_key
        name another backbone of the checkpoint instead (e.g. "backbone", DINO's student)."""
        return "backbone."

    def released_backbone(self) -> nn.Module:
        """The backbone released_prefix names, as a module (the loop's frozen evaluation reads it)."""
        return self.backbone

    @classmethod
    def backbone_kwargs(cls, cfg, options) -> dict:
        """Optional: timm model_kwargs the objective needs of the backbone (e.g. dynamic_img_size for crops of
        several sizes); they change no weight, so the backbone still exports and fine-tunes as a plain timm model."""
        return {}

    @classmethod
    def views(cls, cfg, options) -> Optional["Views"]:
        """Optional: the crops each training image becomes (ssvit.data.Views: count, size, scale, photometric
        augmentation); None for the paper's one random resized crop and flip at --img_size."""
        return None

    @classmethod
    def unlabeled(cls, cfg, options) -> Optional[Unlabeled]:
        """Optional: a second stream of all training images (before --label_fraction), handed to forward as its third
        argument, `unlabeled` (one tensor per view) during training; None (the default): one stream."""
        return None

    @dataclass
    class Options:
        pass

    @classmethod
    def check_options(cls, cfg, options) -> None:
        """Optional: refuse bad options at start-up (before data or model), with a message that names the fix."""

    def __init__(self, backbone: nn.Module, num_classes: int, options: Options):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.options = options
        cfg = getattr(backbone, "pretrained_cfg", {}) or {}
        # Targets such as mean colours are computed on [0, 1] images; the backbone sees them normalised.
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.5, 0.5, 0.5))).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        raise NotImplementedError

    def make_metrics(self):
        """A torchmetrics MetricCollection for validation."""
        raise NotImplementedError

    def update_metrics(self, metrics, outputs: dict[str, torch.Tensor]) -> None:
        """Update the validation metrics from a step's (gathered) outputs."""
        raise NotImplementedError

    def on_init(self, checkpoint: dict[str, torch.Tensor]) -> None:
        """Optional: called once --init's weights are in the backbone, with the whole state dict they came from, e.g.
        to start a momentum teacher from them (a copy made when the objective was built holds the random weights) or
        to take a classifier's head."""

    def on_train_start(self, images) -> None:
        """Optional: called once before a run's first step, not when it resumes (its checkpoint holds what this set),
        with the run's labelled training images (an ImageDataset), e.g. to start a head from the frozen features."""

    def on_train_step(self, out: StepOutput) -> None:
        """Optional: statistics kept over training steps (the loop calls it after each forward of training, every
        micro-step of gradient accumulation)."""

    def on_before_optimizer_step(self, progress: Progress) -> None:
        """Optional: called when the gradients are synchronised and clipped, just before the optimizer step
        (progress.step: the steps done before it), e.g. to hold a layer fixed (DINO's first epoch)."""

    def on_optimizer_step(self, progress: Progress) -> None:
        """Optional: called once per optimizer step, after it (and after the lr scheduler), with the global step
        (e.g. a momentum teacher's update, a schedule of the objective's own)."""

    def health(self, logs: dict[str, float]) -> Optional[str]:
        """Optional: at every logging step, the window's averaged training logs (the same on every process); a
        message stops the run as a non-finite loss does, naming the last good checkpoint (e.g. DINO's collapse)."""
        return None

    def on_evaluate(self, images: torch.Tensor, out_dir: Path, step: int) -> Optional[Path]:
        """Optional: write a figure from a few validation images (main process only)."""
        return None


def joint(main: type[Objective], aux: type[Objective], cfg, aux_options, weight: float, ratio: int) -> type[Objective]:
    """The objective of a joint run (--aux): `main` on the labelled batch plus `weight` x `aux`, a self-supervised
    objective, on a second stream of `ratio` x the batch drawn from every training image in the aux's own views, through
    one backbone, in one step (self-supervised losses trained with the supervised one: DRLoc, Liu et al., NeurIPS 2021,
    arXiv 2106.03746, section 3; Zhai et al.'s S4L, ICCV 2019). It is `main` itself with the aux as a child module
    (`aux.*` in the checkpoint beside main's own keys, the backbone held once), so export, fine-tuning and evaluation
    read it as a `main` checkpoint; every hook of the aux runs after main's."""
    from ssvit.data import View, Views

    own_views = aux.views(cfg, aux_options)  # None: the aux trains on one crop at --img_size, as it would alone
    stream = Unlabeled(own_views or Views((View(cfg.img_size, tuple(cfg.crop_scale), hflip=cfg.hflip),)), ratio)

    class Joint(main):
        @classmethod
        def unlabeled(cls, cfg, options) -> Unlabeled:
            return stream

        @classmethod
        def backbone_kwargs(cls, cfg, options) -> dict:
            return {**main.backbone_kwargs(cfg, options), **aux.backbone_kwargs(cfg, aux_options)}

        def __init__(self, backbone: nn.Module, num_classes: int, options):
            super().__init__(backbone, num_classes, options)
            self.aux = aux(backbone, num_classes, aux_options)
            del self.aux._modules["backbone"]  # one backbone, registered (and saved, and synchronised) once: main's
            object.__setattr__(self.aux, "backbone", backbone)

        def forward(self, images, labels: Optional[torch.Tensor] = None, unlabeled: Optional[list] = None) -> StepOutput:
            out = super().forward(images, labels)
            if unlabeled is None:  # validation and checks: main's alone
                return out
            side = self.aux(unlabeled if own_views is not None else unlabeled[0])
            logs = {**out.logs, "main_loss": out.loss.detach(), "aux_loss": side.loss.detach(),
                    **{f"aux_{k}": v for k, v in side.logs.items()}}  # fmt: skip
            return StepOutput(out.loss + weight * side.loss, logs, out.outputs, {**out.extras, "aux": side})

        def on_init(self, checkpoint):
            super().on_init(checkpoint)
            self.aux.on_init(checkpoint)

        def on_train_step(self, out: StepOutput) -> None:
            super().on_train_step(out)
            if "aux" in out.extras:
                self.aux.on_train_step(out.extras["aux"])

        def on_before_optimizer_step(self, progress: Progress) -> None:
            super().on_before_optimizer_step(progress)
            self.aux.on_before_optimizer_step(progress)

        def on_optimizer_step(self, progress: Progress) -> None:
            super().on_optimizer_step(progress)
            self.aux.on_optimizer_step(progress)

        def health(self, logs: dict[str, float]) -> Optional[str]:
            return super().health(logs) or self.aux.health({k.removeprefix("aux_"): v for k, v in logs.items() if k.startswith("aux_")})

    Joint.__name__ = Joint.__qualname__ = f"{main.__name__}With{aux.__name__}"
    return Joint


# ----------------------------------------------------------------------------------------------------------
# Shared by the pixel-reconstruction objectives (MAE, SimMIM)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, patch * patch * 3), rows of patches in raster order, pixels as (p, q, c) (the
    official code's order)."""
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=patch, q=patch)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int]) -> torch.Tensor:
    return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=patch, q=patch)


def explained(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per image: the share of the masked patches' variance (around each patch's mean) that the prediction explains,
    1 - SSE / SS. 0 for predicting each patch's mean, 1 for a perfect reconstruction; with normalised targets it is
    1 - the loss."""
    sse = ((pred - target).pow(2).sum(-1) * mask).sum(1)
    ss = ((target - target.mean(-1, keepdim=True)).pow(2).sum(-1) * mask).sum(1)
    return 1 - sse / ss.clamp(min=1e-12)


class PixelReconstruction(Objective):
    """What the pixel-reconstruction objectives share: their metrics (the loss, and r2, the share of the masked
    patches' variance explained, which selects the best checkpoint), frozen features and fine-tuning pooling read
    from the mean patch token (no loss reaches the class token's output; both papers fine-tune ViTs on the average
    of the patch tokens; ssvit keeps the encoder's final norm before the average so the weights fit unchanged)."""

    best_metric = "r2"
    needs_labels = False
    representation = "mean"
    classifier_pooling = {"global_pool": "avg", "fc_norm": False}

    def step_output(self, loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> StepOutput:
        with torch.no_grad():  # a metric: no graph kept for it
            r2 = explained(pred.detach(), target, mask)
        outputs = {"loss": loss.detach().expand(len(pred)), "r2": r2.detach()}
        if not self.training:
            outputs |= {"pred": pred.detach(), "mask": mask}
        return StepOutput(loss, {"r2": r2.mean().detach()}, outputs)

    def make_metrics(self):
        import torchmetrics

        return torchmetrics.MetricCollection({name: torchmetrics.MeanMetric() for name in ("loss", "r2")})

    def update_metrics(self, metrics, outputs: dict[str, torch.Tensor]) -> None:
        metrics["loss"].update(outputs["loss"])
        metrics["r2"].update(outputs["r2"])


@torch.no_grad()
def save_reconstructions(objective: "Objective", images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, path: Path) -> Path:
    """A PNG, per row: the image | its masked input (masked patches grey) | the prediction on the masked patches
    with the visible ones pasted back. pred: (B, N, p*p*3) in the normalised image's units; mask: (B, N), 1 masked."""
    from torchvision.utils import save_image

    t = objective.tokens
    true, mask = patchify(objective.normalize(images), t.patch), mask[..., None]
    pixels = lambda p: (unpatchify(p, t.patch, t.grid) * objective.std + objective.mean).clamp(0, 1)  # noqa: E731
    hidden = unpatchify(mask.expand_as(true), t.patch, t.grid)  # 1 on the masked pixels
    rows = [images.float(), pixels(true) * (1 - hidden) + 0.5 * hidden, pixels(true * (1 - mask) + pred * mask)]
    rows = rearrange(rows, "t b c h w -> (b t) c h w")
    rows = torch.nn.functional.interpolate(rows, scale_factor=max(1, -(-96 // images.shape[-1])), mode="nearest")
    save_image(rows, path, nrow=3, padding=2, pad_value=1.0)
    return path
