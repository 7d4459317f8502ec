"""Semi-supervised classification: FixMatch (Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with
Consistency and Confidence", NeurIPS 2020, arXiv 2001.07685; official code google-research/fixmatch), and the
EMA-teacher pseudo-labelling of Semi-ViT (Cai et al., "Semi-supervised Vision Transformers at Scale", NeurIPS 2022,
arXiv 2208.05688, section 3.1).

Beside each labelled batch the loop hands forward a batch of `mu` times as many images drawn from every training
image (Objective.unlabeled), each as a weak view (the labelled images' crop and flip) and a strong view (RandAugment
and Cutout, FixMatch section 2.3). The weak view's prediction, with no gradient, is the pseudo-label; where its
confidence reaches the threshold, the strong view is trained on it (FixMatch eq. 2-4):

    loss = CE(labelled) + lambda_u * mean over the unlabeled batch of 1[max q_weak >= tau] * CE(strong, argmax q_weak)

`--fixmatch.thresholding self_adaptive` replaces the fixed tau by FreeMatch's (Wang et al., "FreeMatch: Self-adaptive
Thresholding for Semi-supervised Learning", ICLR 2023, arXiv 2205.07246, section 3.2; official code: USB's freematch):
an EMA of the mean confidence on the unlabeled images (starting at 1/C), scaled per class by the EMA of the mean
probability of that class over its largest (MaxNorm), so that a weak model trains on its likeliest pseudo-labels early
and a confident one only on its surest later; FreeMatch's fairness loss is not included.

`--fixmatch.teacher model` takes q_weak from the model itself (FixMatch: one forward of labelled, weak and strong
images together); `--fixmatch.teacher ema` from an exponential moving average of the model (Semi-ViT: more stable for
ViTs), which moves once per optimizer step. Without an unlabeled batch (validation) it is the supervised objective.
Semi-ViT's pipeline is pretraining, `ssvit finetune --init PRETRAINED` (supervised), then
`ssvit finetune --init FINETUNED --objective fixmatch`: from a classifier of the same classes the head is kept, and the
EMA teacher starts from the loaded model (on_init).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ssvit.data import RandAugment, View, Views
from ssvit.errors import check_ranges
from ssvit.objectives import register
from ssvit.objectives.base import Progress, StepOutput, Unlabeled
from ssvit.objectives.supervised import Supervised


@register("fixmatch")
class FixMatch(Supervised):
    @dataclass
    class Options(Supervised.Options):
        zero_init_head: bool = True
        """Zero-initialise the head (paper section 3.2 of the ViT paper: fine-tuning heads start at zero)."""
        mu: int = 7
        """Unlabeled images per labelled image in a step (FixMatch: 7)."""
        threshold: float = 0.95
        """Confidence a pseudo-label needs to be trained on (FixMatch: 0.95; Semi-ViT with its EMA teacher: 0.7)."""
        thresholding: Literal["fixed", "self_adaptive"] = "fixed"
        """fixed: `threshold`; self_adaptive: FreeMatch's, from the confidence of the pseudo-labels so far."""
        ema_p: float = 0.999
        """With thresholding self_adaptive: the momentum of its averages, per optimizer step (FreeMatch: 0.999)."""
        lambda_u: float = 1.0
        """Weight of the unlabeled loss (FixMatch: 1)."""
        teacher: Literal["model", "ema"] = "model"
        """Who labels the weak views: the model itself (FixMatch) or its EMA (Semi-ViT)."""
        ema_momentum: float = 0.999
        """With teacher ema: the teacher's momentum per optimizer step (Semi-ViT: 0.9999 at ImageNet's length)."""
        randaugment_ops: int = 2
        """Operations of the strong view's RandAugment (FixMatch: 2, each at a random magnitude)."""
        cutout: float = 0.5
        """Largest Cutout square of the strong view, as a share of the image side (FixMatch: 0.5; 0: none)."""
        init_head: bool = True
        """With --init a classifier checkpoint of the same classes (ssvit finetune's): start from its head too (Semi-ViT
        fine-tunes supervised first, then semi-supervised); any other checkpoint gives a new, zero head."""

    @classmethod
    def check_options(cls, cfg, options: Options) -> None:
        super().check_options(cfg, options)
        o = options
        check_ranges([
            ("mu", o.mu, o.mu >= 1, "1 or more (FixMatch: 7)"),
            ("threshold", o.threshold, 0 <= o.threshold <= 1, "in [0, 1] (FixMatch: 0.95)"),
            ("lambda_u", o.lambda_u, o.lambda_u >= 0, "0 or more (FixMatch: 1)"),
            ("ema_momentum", o.ema_momentum, 0 <= o.ema_momentum < 1, "in [0, 1) (Semi-ViT: 0.9999)"),
            ("ema_p", o.ema_p, 0 <= o.ema_p < 1, "in [0, 1) (FreeMatch: 0.999)"),
            ("randaugment_ops", o.randaugment_ops, o.randaugment_ops >= 0, "0 or more (FixMatch: 2)"),
            ("cutout", o.cutout, 0 <= o.cutout <= 1, "a share of the image side in [0, 1] (FixMatch: 0.5)"),
            ("loss", o.loss, o.loss == "softmax", "softmax: a pseudo-label is one class per image (sigmoid is multi-label)"),
        ], "--fixmatch.")  # fmt: skip

    @classmethod
    def unlabeled(cls, cfg, options: Options) -> Unlabeled:
        weak = View(cfg.img_size, tuple(cfg.crop_scale), hflip=cfg.hflip)
        strong = View(cfg.img_size, tuple(cfg.crop_scale), RandAugment(options.randaugment_ops, cutout=options.cutout), cfg.hflip)
        return Unlabeled(Views((weak, strong)), options.mu)

    def __init__(self, backbone: nn.Module, num_classes: int, options: Options):
        super().__init__(backbone, num_classes, options)
        self.teacher = None
        if options.teacher == "ema":  # starts as the model and is never trained by gradients (Semi-ViT, section 3.1)
            self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "head": copy.deepcopy(self.head)})
            self.teacher.requires_grad_(False)
        if options.thresholding == "self_adaptive":  # FreeMatch's averages, 1/C at the start (section 3.2), resumed with the run
            self.register_buffer("time_p", torch.tensor(1.0 / num_classes))
            self.register_buffer("p_model", torch.full((num_classes,), 1.0 / num_classes))
        self._sums = None

    @torch.no_grad()
    def on_init(self, checkpoint: dict[str, torch.Tensor]) -> None:
        """From a classifier of the same classes (a supervised fine-tuning: Semi-ViT's order, section 3.1), the head
        too, so that pseudo-labels start confident; from any other checkpoint the head stays new. The EMA teacher
        starts as the model now is."""
        head = {k.removeprefix("head."): v for k, v in checkpoint.items() if k.startswith("head.")}
        own = self.head.state_dict()
        if self.options.init_head and head.keys() == own.keys() and all(head[k].shape == own[k].shape for k in own):
            self.head.load_state_dict(head)
        if self.teacher is not None:
            self.teacher["backbone"].load_state_dict(self.backbone.state_dict())
            self.teacher["head"].load_state_dict(self.head.state_dict())

    @torch.no_grad()
    def on_train_start(self, images) -> None:
        super().on_train_start(images)
        if self.teacher is not None:  # a head set there (lsq_head) is the teacher's too
            self.teacher["head"].load_state_dict(self.head.state_dict())

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # no drop path nor dropout in the teacher
        return self

    def forward(self, images: torch.Tensor, labels: torch.Tensor, unlabeled: Optional[list[torch.Tensor]] = None) -> StepOutput:
        if unlabeled is None:  # validation, or a check of the weights on a labelled batch
            return super().forward(images, labels)
        o, n = self.options, len(images)
        weak, strong = unlabeled
        if self.teacher is None:  # one forward of all three, the weak logits detached (the official code's)
            logits = self.logits(torch.cat([images, weak, strong]))
            labelled, weak_logits, strong_logits = logits[:n], logits[n : n + len(weak)].detach(), logits[n + len(weak) :]
        else:
            with torch.no_grad():
                weak_logits = self.teacher["head"](self.teacher["backbone"](self.normalize(weak)))
            logits = self.logits(torch.cat([images, strong]))
            labelled, strong_logits = logits[:n], logits[n:]
        probs = F.softmax(weak_logits.float(), dim=-1)
        confidence, pseudo = probs.max(-1)
        if o.thresholding == "fixed":
            threshold = torch.full_like(confidence, o.threshold)
        else:  # tau_t(c) = MaxNorm(p~_t)(c) * tau_t (FreeMatch, section 3.2), from the averages of the steps before this one
            threshold = (self.p_model / self.p_model.max() * self.time_p)[pseudo]
        mask = (confidence >= threshold).float()
        supervised = F.cross_entropy(labelled.float(), labels, label_smoothing=o.label_smoothing)
        consistency = (F.cross_entropy(strong_logits.float(), pseudo, reduction="none") * mask).mean()
        accuracy = (labelled.argmax(-1) == labels).float().mean()
        logs = {"accuracy": accuracy.detach(), "loss_x": supervised.detach(), "loss_u": consistency.detach(),
                "mask": mask.mean(), "confidence": confidence.mean(), "threshold": threshold.mean()}  # fmt: skip
        sums = torch.cat([confidence.sum()[None], probs.sum(0), torch.tensor([len(probs)], device=probs.device)])
        return StepOutput(supervised + o.lambda_u * consistency, logs, extras={"pseudo": pseudo, "mask": mask, "sums": sums.detach()})

    def on_train_step(self, out: StepOutput) -> None:
        """Sum the weak views' confidence and probabilities over the micro-steps of one optimizer step."""
        if self.options.thresholding == "self_adaptive" and "sums" in out.extras:  # not on a labelled-only batch
            self._sums = out.extras["sums"] if self._sums is None else self._sums + out.extras["sums"]

    @torch.no_grad()
    def on_optimizer_step(self, progress: Progress) -> None:
        """The EMA teacher and the self-adaptive threshold's averages move once per optimizer step, after it, the
        averages over the global batch (every process's unlabeled images)."""
        if self.options.thresholding == "self_adaptive" and self._sums is not None:
            sums = self._sums.clone()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(sums)
            m, rows = self.options.ema_p, sums[-1]
            self.time_p.mul_(m).add_(sums[0] / rows, alpha=1 - m)  # the global threshold (FreeMatch, section 3.2)
            self.p_model.mul_(m).add_(sums[1:-1] / rows, alpha=1 - m)  # the local, per-class averages
        self._sums = None
        if self.teacher is not None:
            m = self.options.ema_momentum
            for t, s in zip([*self.teacher["backbone"].parameters(), *self.teacher["head"].parameters()],
                            [*self.backbone.parameters(), *self.head.parameters()]):  # fmt: skip
                t.lerp_(s.detach(), 1 - m)
