"""A new objective in one file: predict which of four rotations was applied (Gidaris et al., 2018).

Copy it into objectives/ (every module there is imported on first use) and train with it:

    cp examples/rotation.py objectives/
    accelerate launch ssvit/pretrain.py --objective rotation --rotation.label_smoothing 0.1

tests/test_extension.py imports this file as objectives/ would and trains with it.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchmetrics

from ssvit.objectives import register
from ssvit.objectives.base import Objective, StepOutput


@register("rotation")
class Rotation(Objective):
    """Predict which of four rotations was applied (Gidaris et al., 2018)."""

    needs_labels = False  # trains on unlabeled images

    @dataclass
    class Options:
        label_smoothing: float = 0.0

    def __init__(self, backbone, num_classes, options):
        super().__init__(backbone, num_classes, options)
        self.head = torch.nn.Linear(backbone.num_features, 4)

    def forward(self, images, labels):
        k = torch.randint(0, 4, (len(images),), device=images.device)
        rotated = torch.stack([torch.rot90(img, int(r), dims=(1, 2)) for img, r in zip(images, k)])
        logits = self.head(self.backbone(self.normalize(rotated))).float()
        loss = F.cross_entropy(logits, k, label_smoothing=self.options.label_smoothing)
        # outputs: per-image tensors; in validation they are gathered from every process, then scored
        return StepOutput(loss, outputs={"logits": logits.detach(), "rotation": k})

    def make_metrics(self):
        return torchmetrics.MetricCollection({"rotation_accuracy": torchmetrics.Accuracy("multiclass", num_classes=4)})

    def update_metrics(self, metrics, outputs):
        metrics.update(outputs["logits"], outputs["rotation"])
