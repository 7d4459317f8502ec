"""DINO: self-distillation with no labels (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021, arXiv 2104.14294), as in the paper and its official code (facebookresearch/dino:
main_dino.py, vision_transformer.py's DINOHead, utils.py's schedules).

A student (the backbone and a projection head) is trained to match, on every pair of different views of an image,
the output of a teacher that is an exponential moving average of it (section 3.1, "Teacher network"): the teacher
sees the two global crops only, the student every crop (multi-crop, section 3.1); the teacher's outputs are centred
by a running mean of its own outputs and sharpened by a low temperature, which together avoid collapse (section 3.1,
"Avoiding collapse"). Nothing in forward changes state: the centre moves in on_train_step, the teacher, its
temperature and the weight decay in on_optimizer_step, once per optimizer step.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ssvit.data import Photometric, View, Views
from ssvit.errors import UsageError, check_ranges
from ssvit.objectives import register
from ssvit.objectives.base import Objective, Progress, StepOutput, token_geometry


class DINOHead(nn.Module):
    """The projection head (official DINOHead): a 3-layer MLP (GELU) to a bottleneck, L2-normalised, then a
    weight-normalised linear layer without bias whose norm is fixed to 1 (norm_last_layer), initialised as the
    official one (truncated normal 0.02, zero biases)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, norm_last_layer: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))  # fmt: skip
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False)) written out: w = g * v / ||v|| per output unit
        self.last_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.kaiming_uniform_(self.last_v, a=math.sqrt(5))  # nn.Linear's own initialisation
        self.last_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def last_layer(self) -> list[nn.Parameter]:
        return [p for p in (self.last_v, self.last_g) if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, self.last_g * F.normalize(self.last_v, dim=1))


def cosine(start: float, end: float, step: int, total: int) -> float:
    """The official cosine_scheduler at iteration `step` of `total`: start at 0, end at the last iteration."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], centre: torch.Tensor, student_temp: float,
              teacher_temp: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Cross-entropy between the centred, sharpened teacher distribution of each global view and the student's
    distribution of every other view (section 3.1, eq. 3; official DINOLoss), averaged over the pairs: every (teacher
    view, student view) pair in one einsum, the pairs of a view with itself masked out. Returns the loss and the
    teacher's probabilities (one row per image of each global view)."""
    targets = F.softmax((torch.stack(teacher) - centre) / teacher_temp, dim=-1)  # (G, B, K)
    logs = F.log_softmax(torch.stack(student) / student_temp, dim=-1)  # (V, B, K): every view's outputs are (B, K)
    cross = -torch.einsum("gbk,vbk->gv", targets, logs) / targets.shape[1]  # mean over images, per pair
    other = ~torch.eye(*cross.shape, dtype=torch.bool, device=cross.device)  # view g is its own teacher's view
    return cross[other].mean(), rearrange(targets, "g b k -> (g b) k")


@register("dino")
class DINO(Objective):
    best_metric = None  # no label-free score ranks DINO's checkpoints: the last one is released, as the paper does
    needs_labels = False
    representation = "prelogits"  # the class token after the final norm, as DINO's k-NN and linear evaluations read it

    @dataclass
    class Options:
        out_dim: int = 4096
        """Outputs of the head's last layer (paper: 65,536 for ViT-S/B; 4,096 here, for the tiny CPU models)."""
        hidden_dim: int = 2048
        bottleneck_dim: int = 256
        norm_last_layer: bool = True
        """Fix the norm of the last layer's weights (paper's default; more stable)."""
        global_crops: int = 2
        global_crop_size: Optional[int] = None
        """Pixels; unset: --img_size (224 in the paper)."""
        global_crops_scale: tuple[float, float] = (0.4, 1.0)
        local_crops: int = 8
        """Local crops per image (the official default; the paper's best models use 10, Table 9)."""
        local_crop_size: Optional[int] = None
        """Pixels; unset: --img_size x 96 / 224, rounded to the patch (96 px at 224 as in the paper)."""
        local_crops_scale: tuple[float, float] = (0.05, 0.4)
        blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5)
        """Gaussian blur probability of the first global, the second global and each local crop (paper's)."""
        solarize_prob: float = 0.2
        """Solarisation probability of the second global crop (paper's)."""
        momentum_teacher: float = 0.996
        """Teacher EMA momentum at the start, raised to 1 by a cosine schedule (paper: 0.996)."""
        warmup_teacher_temp: float = 0.04
        teacher_temp: float = 0.07
        """Teacher temperature after its linear warm-up from warmup_teacher_temp (paper: 0.04 -> 0.07)."""
        warmup_teacher_temp_epochs: float = 30
        student_temp: float = 0.1
        center_momentum: float = 0.9
        weight_decay_end: float = 0.4
        """Weight decay at the end of its cosine schedule from --weight_decay (paper: 0.04 -> 0.4)."""
        freeze_last_layer_epochs: float = 1
        """The head's last layer is held fixed for these first epochs (paper: 1)."""
        collapse_logs: int = 5
        """Stop when the teacher's output entropy stays at zero or at its maximum for this many logging steps."""

    @classmethod
    def check_options(cls, cfg, options: Options) -> None:
        o = options
        check_ranges([
            ("global_crops", o.global_crops, o.global_crops >= 1, "1 or more (the teacher's views; paper: 2)"),
            ("local_crops", o.local_crops, o.local_crops >= 0 and o.global_crops + o.local_crops >= 2,
             "0 or more, with at least two crops in all: the loss compares pairs of different views"),
            ("momentum_teacher", o.momentum_teacher, 0 <= o.momentum_teacher <= 1, "in [0, 1] (paper: 0.996)"),
            ("center_momentum", o.center_momentum, 0 <= o.center_momentum <= 1, "in [0, 1] (paper: 0.9)"),
            ("student_temp", o.student_temp, o.student_temp > 0, "above 0 (paper: 0.1)"),
            ("teacher_temp", o.teacher_temp, 0 < o.teacher_temp <= o.student_temp and 0 < o.warmup_teacher_temp <= o.student_temp,
             f"above 0 and at most --dino.student_temp {o.student_temp}, as --dino.warmup_teacher_temp must be: a teacher "
             f"softer than its student does not sharpen (paper: 0.04 -> 0.07 against 0.1)"),
            ("out_dim", o.out_dim, o.out_dim >= 2, "2 or more"),
            ("hidden_dim", o.hidden_dim, o.hidden_dim >= 1, "1 or more"),
            ("bottleneck_dim", o.bottleneck_dim, o.bottleneck_dim >= 1, "1 or more"),
            ("global_crops_scale", list(o.global_crops_scale), 0 < o.global_crops_scale[0] <= o.global_crops_scale[1] <= 1, "[min, max] within (0, 1]"),
            ("local_crops_scale", list(o.local_crops_scale), 0 < o.local_crops_scale[0] <= o.local_crops_scale[1] <= 1, "[min, max] within (0, 1]"),
            ("blur_probs", list(o.blur_probs), all(0 <= p <= 1 for p in o.blur_probs), "three probabilities"),
            ("solarize_prob", o.solarize_prob, 0 <= o.solarize_prob <= 1, "a probability"),
            ("warmup_teacher_temp_epochs", o.warmup_teacher_temp_epochs, o.warmup_teacher_temp_epochs >= 0, "0 or more"),
            ("freeze_last_layer_epochs", o.freeze_last_layer_epochs, o.freeze_last_layer_epochs >= 0, "0 or more"),
            ("weight_decay_end", o.weight_decay_end, o.weight_decay_end >= 0, "0 or more (paper: 0.4)"),
            ("collapse_logs", o.collapse_logs, o.collapse_logs >= 1, "1 or more"),
        ], "--dino.")  # fmt: skip
        sizes = cls.crop_sizes(cfg, o)
        if sizes[1] > sizes[0]:
            raise UsageError(f"--dino.local_crop_size {sizes[1]} is larger than the global crops ({sizes[0]} px): local "
                             f"crops are the small views (paper: 96 px against 224).")  # fmt: skip

    @staticmethod
    def crop_sizes(cfg, o: Options) -> tuple[int, int]:
        geometry = token_geometry(cfg)  # pixels per token, read from the backbone (16 for a model without tokens)
        patch = geometry[0] if geometry else 16
        local = o.local_crop_size or max(patch, round(cfg.img_size * 96 / 224 / patch) * patch)
        return o.global_crop_size or cfg.img_size, local

    @classmethod
    def backbone_kwargs(cls, cfg, options: Options) -> dict:
        return {"dynamic_img_size": True} if cfg.model.startswith("vit") else {}  # crops of two sizes, one position table

    @classmethod
    def views(cls, cfg, options: Options) -> Views:
        """DataAugmentationDINO: global crops with blur (p 1.0, then 0.1) and, on the second, solarisation; local
        crops with blur (p 0.5); all resized bicubic (the official RandomResizedCrop's interpolation), with flips,
        colour jitter (0.4, 0.4, 0.2, 0.1; p 0.8) and grayscale (p 0.2). The local crops' position table is timm's
        resampling (dynamic_img_size: bicubic with antialiasing), not the official interpolate_pos_encoding (bicubic
        without): a choice, so that the backbone stays a plain timm model; the tables differ by 7 to 46%."""
        o, (size, local) = options, cls.crop_sizes(cfg, options)
        first, second, small = o.blur_probs
        globals_ = [View(size, tuple(o.global_crops_scale), Photometric(blur_prob=first if i % 2 == 0 else second,
                                                                          solarize_prob=0.0 if i % 2 == 0 else o.solarize_prob),
                         interpolation="bicubic")
                    for i in range(o.global_crops)]  # fmt: skip
        locals_ = [View(local, tuple(o.local_crops_scale), Photometric(blur_prob=small), interpolation="bicubic") for _ in range(o.local_crops)]
        return Views(tuple(globals_ + locals_))

    def __init__(self, backbone: nn.Module, num_classes: int, options: Options):
        super().__init__(backbone, num_classes, options)
        if isinstance(getattr(backbone, "global_pool", None), str) and not backbone.global_pool:
            raise UsageError("--objective dino needs one feature vector per image (it projects the class token or the "
                             "pooled features), and this model returns its tokens (global_pool ''): use global_pool "
                             "token or avg in --model_kwargs.")  # fmt: skip
        o = options
        self.head = DINOHead(backbone.num_features, o.out_dim, o.hidden_dim, o.bottleneck_dim, o.norm_last_layer)
        # The teacher starts as the student and is never trained by gradients (section 3.1).
        self.teacher_backbone, self.teacher_head = copy.deepcopy(backbone), copy.deepcopy(self.head)
        for p in [*self.teacher_backbone.parameters(), *self.teacher_head.parameters()]:
            p.requires_grad_(False)
        self.register_buffer("centre", torch.zeros(1, o.out_dim))
        # The official schedule starts at warmup_teacher_temp, or at teacher_temp when there is no warm-up.
        self.register_buffer("teacher_temp_now", torch.tensor(o.warmup_teacher_temp if o.warmup_teacher_temp_epochs else o.teacher_temp))
        self._sums, self._rows, self._low_or_high = None, 0, 0

    @classmethod
    def released_prefix(cls) -> str:
        return "teacher_backbone."  # DINO releases the teacher (section 3.1; its checkpoints' "teacher" weights)

    def released_backbone(self) -> nn.Module:
        return self.teacher_backbone

    @torch.no_grad()
    def on_init(self, checkpoint: dict[str, torch.Tensor]) -> None:
        """The teacher starts as the student, which --init has just loaded (section 3.1)."""
        self.teacher_backbone.load_state_dict(self.backbone.state_dict())

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_backbone.eval()  # no drop path nor dropout in the teacher, as the official one is built
        self.teacher_head.eval()
        return self

    def forward(self, images, labels: Optional[torch.Tensor] = None) -> StepOutput:
        o = self.options
        training_views = isinstance(images, (list, tuple))
        views = images if training_views else [images]  # evaluation: one view, the image as stored
        n_global = min(o.global_crops, len(views))
        # One pass per view. (The official MultiCropWrapper concatenates the views of one size into one batch; the
        # same arithmetic, but on CPU a batch of two global views ran 27% slower than two passes.)
        student = [self.head(self.backbone(self.normalize(v))).float() for v in views]
        with torch.no_grad():
            teacher = torch.cat([self.teacher_head(self.teacher_backbone(self.normalize(v))).float() for v in views[:n_global]])
        temp = self.teacher_temp_now  # a tensor: no host sync on a GPU
        if not training_views:  # validation: the student against the teacher on the same image
            q = F.softmax((teacher - self.centre) / temp, dim=-1)
            per_image = torch.sum(-q * F.log_softmax(student[0] / o.student_temp, dim=-1), dim=-1)
            entropy = -(q * q.clamp_min(1e-12).log()).sum(-1)
            return StepOutput(per_image.mean(), outputs={"loss": per_image.detach(), "teacher_entropy": entropy})
        loss, q = dino_loss(student, list(teacher.chunk(n_global)), self.centre, o.student_temp, temp)
        with torch.no_grad():
            entropy = -(q * q.clamp_min(1e-12).log()).sum(-1)
            mean = q.mean(0, keepdim=True)
            kl = (q * (q.clamp_min(1e-12).log() - mean.clamp_min(1e-12).log())).sum(-1)
        logs = {"teacher_entropy": entropy.mean(), "teacher_kl": kl.mean(), "teacher_temp": self.teacher_temp_now.clone()}
        return StepOutput(loss, logs, extras={"teacher_sum": teacher.sum(0, keepdim=True), "teacher_rows": len(teacher)})

    def make_metrics(self):
        import torchmetrics

        return torchmetrics.MetricCollection({k: torchmetrics.MeanMetric() for k in ("loss", "teacher_entropy")})

    def update_metrics(self, metrics, outputs: dict[str, torch.Tensor]) -> None:
        for k in ("loss", "teacher_entropy"):
            metrics[k].update(outputs[k])

    # ---- state kept over training: never in forward ----------------------------------------------------------

    def on_train_step(self, out: StepOutput) -> None:
        """Sum the teacher's outputs over the micro-steps of one optimizer step (its centre moves once per step)."""
        self._sums = out.extras["teacher_sum"] if self._sums is None else self._sums + out.extras["teacher_sum"]
        self._rows += out.extras["teacher_rows"]

    def on_before_optimizer_step(self, progress: Progress) -> None:
        """The last layer is held fixed for the first epoch(s): its gradients are dropped, as the official
        cancel_gradients_last_layer does, so the optimizer skips it (weight decay included)."""
        if progress.step < self.options.freeze_last_layer_epochs * progress.steps_per_epoch:
            for p in self.head.last_layer():
                p.grad = None

    @torch.no_grad()
    def on_optimizer_step(self, progress: Progress) -> None:
        o, it = self.options, progress.step - 1  # the official schedules index iterations from 0
        # The centre: an EMA of the batch mean of the teacher's outputs over every process (official update_center).
        if self._sums is not None:
            sums, rows = self._sums.clone(), torch.tensor(float(self._rows), device=self._sums.device)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(sums)
                dist.all_reduce(rows)
            self.centre.mul_(o.center_momentum).add_(sums / rows, alpha=1 - o.center_momentum)
            self._sums, self._rows = None, 0
        # The teacher: an EMA of the student with the momentum of iteration `it` (cosine from momentum_teacher to 1).
        m = cosine(o.momentum_teacher, 1.0, it, progress.max_steps)
        for t, s in zip([*self.teacher_backbone.parameters(), *self.teacher_head.parameters()],
                        [*self.backbone.parameters(), *self.head.parameters()]):  # fmt: skip
            t.lerp_(s.detach(), 1 - m)
        # The next iteration's teacher temperature (linear warm-up) and weight decay (cosine, on the groups that
        # started with one: --weight_decay, kept in the group so that a resumed run continues the same schedule).
        warm = o.warmup_teacher_temp_epochs * progress.steps_per_epoch
        frac = min(progress.step / warm, 1.0) if warm else 1.0
        self.teacher_temp_now.fill_(o.warmup_teacher_temp + (o.teacher_temp - o.warmup_teacher_temp) * frac)
        for group in progress.optimizer.param_groups:
            start = group.setdefault("dino_weight_decay_start", group["weight_decay"])
            if start > 0:
                group["weight_decay"] = cosine(start, o.weight_decay_end, progress.step, progress.max_steps)

    def health(self, logs: dict[str, float]) -> Optional[str]:
        """Collapse (section 5.3): every output the same one-hot (entropy 0) or uniform (entropy log K)."""
        entropy, top = logs.get("teacher_entropy"), math.log(self.options.out_dim)
        if entropy is None:
            return None
        self._low_or_high = self._low_or_high + 1 if entropy < 0.01 * top or entropy > 0.99 * top else 0
        if self._low_or_high >= self.options.collapse_logs:
            kind = "one output for every image (entropy 0)" if entropy < 0.01 * top else "uniform outputs (entropy at its maximum)"
            return (f"DINO collapsed: the teacher gives {kind} for {self._low_or_high} logging steps (teacher_entropy "
                    f"{entropy:.4f} of at most {top:.2f}). Lower --lr, raise --dino.center_momentum or lower --dino.teacher_temp")
        return None
