"""The objective interface: what one training signal owns (head, extra parameters, targets, loss, metrics).

The backbone is a plain timm model created with ``num_classes=0`` and knows nothing of the objective, so
exporting a backbone is exporting that timm model (``objective.backbone``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn


@dataclass
class StepOutput:
    loss: torch.Tensor
    """Scalar training loss."""
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached scalar tensors to log (no .item() here: the loop syncs only at log intervals)."""
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-image tensors (batch dimension first) from which update_metrics scores the step; in evaluation the
    loop gathers them from every process (accelerator.gather_for_metrics) before update_metrics sees them."""


def mlp_tanh_head(dim: int, out_dim: int, hidden_dim: Optional[int] = None) -> nn.Sequential:
    """The ViT paper's pretraining head: an MLP with one tanh hidden layer (section 3.1)."""
    hidden_dim = hidden_dim or dim
    return nn.Sequential(nn.Linear(dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, out_dim))


class Objective(nn.Module):
    """Wraps a timm backbone. ``forward(images, labels)`` takes images in [0, 1] and returns a StepOutput.

    One path computes predictions and loss (forward); validation metrics are updated from its outputs."""

    best_metric: Optional[str] = None
    """Validation metric (higher is better) that selects the best checkpoint, e.g. "top1"."""
    needs_labels: bool = True
    """False for self-supervised objectives: they train on images without labels."""

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

    def on_train_step(self, out: StepOutput) -> None:
        """Optional: statistics kept over training steps (the loop calls it after each forward)."""

    def on_evaluate(self, images: torch.Tensor, out_dir: Path, step: int) -> Optional[Path]:
        """Optional: write a figure from a few validation images (main process only)."""
        return None
