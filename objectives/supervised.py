"""Supervised classification: softmax cross-entropy (optionally label-smoothed) or the sigmoid
cross-entropy the ViT paper used for multi-label JFT pretraining (section 4.1). Fine-tuning is this
objective with a zero-initialised linear head (paper, section 3.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from ssvit.objectives import register
from ssvit.objectives.base import Objective, StepOutput, mlp_tanh_head
from ssvit.errors import check_ranges


@register("supervised")
class Supervised(Objective):
    best_metric = "top1"

    @dataclass
    class Options:
        loss: Literal["softmax", "sigmoid"] = "softmax"
        """softmax cross-entropy, or per-class sigmoid cross-entropy (paper: JFT pretraining)."""
        label_smoothing: float = 0.0
        head: Literal["linear", "mlp_tanh"] = "linear"
        """linear, or the paper's pretraining head: an MLP with one tanh hidden layer."""
        zero_init_head: bool = False
        """Zero-initialise the head's last layer (paper section 3.2: fine-tuning heads start at zero)."""
        lsq_head: bool = False
        """Start the (linear) head from the least-squares read-out of the frozen features of the labelled images, then
        fine-tune everything: LP-FT (Kumar et al., ICLR 2022, arXiv 2202.10054, section 3), with the ViT paper's closed-form
        read-out (`ssvit evaluate --lsq`) as the linear probe."""

    @classmethod
    def check_options(cls, cfg, options: Options) -> None:
        check_ranges([("label_smoothing", options.label_smoothing, 0 <= options.label_smoothing < 1, "in [0, 1) (e.g. 0.1)"),
                      ("lsq_head", options.lsq_head, not options.lsq_head or options.head == "linear",
                       f"used with a linear head (--{cls.name}.head linear): the read-out is linear"),
                      ("lsq_head", options.lsq_head, not (options.lsq_head and cfg.streaming),
                       "used without --streaming: the labelled images are read once before training")],
                     f"--{cls.name}.")  # fmt: skip

    def __init__(self, backbone: nn.Module, num_classes: int, options: Options):
        super().__init__(backbone, num_classes, options)
        dim = backbone.num_features
        self.head = nn.Linear(dim, num_classes) if options.head == "linear" else mlp_tanh_head(dim, num_classes)
        last = self.head if isinstance(self.head, nn.Linear) else self.head[-1]
        if options.zero_init_head:
            nn.init.zeros_(last.weight)
        else:
            nn.init.trunc_normal_(last.weight, std=0.02)
        nn.init.zeros_(last.bias)

    @torch.no_grad()
    def on_train_start(self, images) -> None:
        """With lsq_head: the head becomes LsqReadout on the features it reads (the backbone's pooled output, eval
        mode), its standardisation and bias feature folded into the head's weight and bias."""
        if not self.options.lsq_head:
            return
        from ssvit.features import FEWSHOT_BIAS, LsqReadout, extract_features

        was_training = self.training
        features, labels = extract_features(self.backbone, images.augmented(None), "prelogits", device=self.head.weight.device,
                                            mean=self.mean, std=self.std, desc="lsq_head features")  # fmt: skip
        self.train(was_training)
        readout = LsqReadout.fit(features, labels, self.num_classes)
        # scores = ((x - mean) / std) @ W[:-1] + 100 W[-1]  =  x @ (W[:-1] / std^T) + (100 W[-1] - (mean / std) @ W[:-1])
        weight = readout.weights[:-1] / readout.std.T
        bias = FEWSHOT_BIAS * readout.weights[-1] - (readout.mean / readout.std) @ readout.weights[:-1]
        self.head.weight.copy_(weight.T)
        self.head.bias.copy_(bias.squeeze(0))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.normalize(images)))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        logits = self.logits(images)
        if self.options.loss == "sigmoid":
            targets = F.one_hot(labels, self.num_classes).to(logits.dtype)
            eps = self.options.label_smoothing
            targets = targets * (1 - eps) + eps / self.num_classes
            # Sum over classes, mean over images (the JFT sigmoid loss of the paper's big_vision code).
            loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum") / len(labels)
        else:
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.options.label_smoothing)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return StepOutput(loss, {"accuracy": accuracy.detach()}, {"logits": logits.detach().float(), "labels": labels})

    def make_metrics(self) -> torchmetrics.MetricCollection:
        top_k = min(5, self.num_classes)
        return torchmetrics.MetricCollection(
            {
                "top1": torchmetrics.Accuracy("multiclass", num_classes=self.num_classes),
                f"top{top_k}": torchmetrics.Accuracy("multiclass", num_classes=self.num_classes, top_k=top_k),
            }
        )

    def update_metrics(self, metrics, outputs: dict[str, torch.Tensor]) -> None:
        metrics.update(outputs["logits"], outputs["labels"])
