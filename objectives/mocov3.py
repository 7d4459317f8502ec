"""MoCo v3: contrastive learning with a momentum encoder (Chen, Xie, He, "An Empirical Study of Training
Self-Supervised Vision Transformers", ICCV 2021, arXiv 2104.02057), as in the paper and its official code
(facebookresearch/moco-v3: moco/builder.py, vits.py, main_moco.py).

Each image becomes two views (BYOL's augmentation, section 3 "Augmentations"). The base encoder (the backbone, a
3-layer projection MLP and a 2-layer prediction MLP) gives queries q1, q2; the momentum encoder (backbone and
projector, an exponential moving average of the base ones, no predictor) gives keys k1, k2. The loss is the
symmetrised InfoNCE of each query against the other view's keys of the whole global batch (section 3, Algorithm 1):

    loss = ctr(q1, k2) + ctr(q2, k1),    ctr(q, k) = 2T * CE(q . k_all / T, own image)

with the keys gathered from every process and gradients only through the local queries (the official
concat_all_gather). The patch projection is random and frozen (section 4.2, "stop_grad_conv1": it stabilises ViT
training), the position embeddings fixed 2-D sine-cosine (official vits.py). Nothing in forward changes state but
the batch-norm statistics: the momentum encoder moves in on_optimizer_step, once per optimizer step, with the
momentum of the official cosine schedule from `momentum` to 1.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed
from torch import nn

from ssvit.data import Photometric, View, Views
from ssvit.errors import UsageError, check_ranges
from ssvit.objectives import register
from ssvit.objectives.base import Objective, Progress, StepOutput


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch, every process's rows (the official
    code converts its MLPs to SyncBatchNorm; PyTorch's runs on GPUs only, this one on any device). The statistics
    are summed with a differentiable all_reduce, so every row's gradient sees every process's rows, as
    SyncBatchNorm's does; the state dict is BatchNorm1d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed()):
            return super().forward(x)  # one process: its batch is the global batch (PyTorch's fused kernel)
        return self.synchronised(x)

    def synchronised(self, x: torch.Tensor) -> torch.Tensor:
        """Training-mode batch norm with the statistics of every process's rows."""
        xf = x.float()
        stats = torch.cat([xf.sum(0), xf.pow(2).sum(0), xf.new_full((1,), len(x))])
        if distributed():
            from torch.distributed.nn.functional import all_reduce

            stats = all_reduce(stats)
        d, n = x.shape[1], stats[-1]
        mean = stats[:d] / n
        var = (stats[d : 2 * d] / n - mean.pow(2)).clamp_min(0)  # biased, as BatchNorm normalises with
        with torch.no_grad():  # running statistics as BatchNorm1d keeps them (unbiased variance)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1).clamp_min(1), self.momentum)
            self.num_batches_tracked += 1
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def mlp(layers: int, in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """The official _build_mlp: linear layers without bias, batch norm and ReLU between them, and a last batch norm
    without affine parameters."""
    modules = []
    for i in range(layers):
        last = i == layers - 1
        modules += [nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim, bias=False),
                    GlobalBatchNorm1d(out_dim if last else hidden_dim, affine=not last)]  # fmt: skip
        if not last:
            modules.append(nn.ReLU(inplace=True))
    return nn.Sequential(*modules)


def gather_keys(keys: torch.Tensor) -> torch.Tensor:
    """The keys of every process, in rank order (no gradient: the official concat_all_gather)."""
    if not distributed():
        return keys
    parts = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, keys.contiguous())
    return torch.cat(parts)


def contrastive(q: torch.Tensor, k: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of the local queries q (n, d) against the global keys k (N, d): each query's positive is its own
    image's key, at offset rank x n among gathered keys (official ctr_loss). Returns the mean cross-entropy and the
    top-1 hits."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    logits = torch.einsum("nc,mc->nm", q, k) / temperature
    offset = len(q) * dist.get_rank() if len(k) > len(q) else 0  # keys of every process, or of this one only
    own = torch.arange(len(q), device=q.device) + offset
    return F.cross_entropy(logits, own), (logits.argmax(1) == own).float()


def vit_init(backbone: nn.Module) -> None:
    """The official VisionTransformerMoCo initialisation: xavier-uniform linear layers (q, k and v each as its own
    matrix), zero biases, the class token at std 1e-6, and the patch projection xavier-uniform over its fan."""
    for name, m in backbone.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:
                bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if getattr(backbone, "cls_token", None) is not None:
        nn.init.normal_(backbone.cls_token, std=1e-6)
    proj = backbone.patch_embed.proj
    bound = math.sqrt(6.0 / (proj.weight[0].numel() + proj.weight.shape[0]))
    nn.init.uniform_(proj.weight, -bound, bound)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)


@register("mocov3")
class MoCoV3(Objective):
    best_metric = None  # no label-free score ranks the checkpoints: the last one is released, as the paper does
    needs_labels = False
    representation = "prelogits"  # the class token after the final norm, what the official linear probe reads

    @dataclass
    class Options:
        dim: int = 256
        """Outputs of the projection and prediction MLPs (official --moco-dim)."""
        mlp_dim: int = 4096
        """Hidden width of both MLPs (official --moco-mlp-dim)."""
        temperature: float = 0.2
        """Softmax temperature T (official --moco-t: 0.2 for ViT); the loss is scaled by 2T as the official code."""
        momentum: float = 0.99
        """Momentum encoder's momentum at the start (official --moco-m: 0.99 for ViT)."""
        momentum_cos: bool = True
        """Raise the momentum to 1 by a cosine over training (official --moco-m-cos, on for ViT)."""
        stop_grad_conv1: bool = True
        """Freeze the random patch projection (section 4.2; official --stop-grad-conv1, on for ViT)."""
        sincos_pos_embed: bool = True
        """Fixed 2-D sine-cosine position embeddings, not trained (official vits.py)."""
        crop_scale: tuple[float, float] = (0.08, 1.0)
        """Scale range of both views' random resized crops (official --crop-min 0.08)."""
        blur_probs: tuple[float, float] = (1.0, 0.1)
        """Gaussian blur probability of the first and second view (BYOL's, the official augmentation1/2)."""
        solarize_probs: tuple[float, float] = (0.0, 0.2)
        """Solarisation probability of the first and second view (BYOL's)."""

    @classmethod
    def check_options(cls, cfg, options: Options) -> None:
        o = options
        check_ranges([
            ("dim", o.dim, o.dim >= 1, "1 or more (official: 256)"),
            ("mlp_dim", o.mlp_dim, o.mlp_dim >= 1, "1 or more (official: 4096)"),
            ("temperature", o.temperature, o.temperature > 0, "above 0 (official for ViT: 0.2)"),
            ("momentum", o.momentum, 0 <= o.momentum <= 1, "in [0, 1] (official for ViT: 0.99)"),
            ("crop_scale", list(o.crop_scale), 0 < o.crop_scale[0] <= o.crop_scale[1] <= 1, "[min, max] within (0, 1]"),
            ("blur_probs", list(o.blur_probs), all(0 <= p <= 1 for p in o.blur_probs), "two probabilities"),
            ("solarize_probs", list(o.solarize_probs), all(0 <= p <= 1 for p in o.solarize_probs), "two probabilities"),
        ], "--mocov3.")  # fmt: skip
        if cfg.batch_size < 2:
            raise UsageError(f"--objective mocov3 contrasts each image with the rest of its batch: --batch_size "
                             f"{cfg.batch_size} has no other image; use 2 or more (paper: 4096).")  # fmt: skip

    @classmethod
    def views(cls, cfg, options: Options) -> Views:
        """BYOL's two views (official main_moco.py): random resized crop (0.08-1), colour jitter (0.4, 0.4, 0.2,
        0.1; p 0.8), grayscale (p 0.2), Gaussian blur with sigma in [0.1, 2] (p 1.0, then 0.1), solarisation (p 0,
        then 0.2), flip."""
        o = options
        return Views(tuple(View(cfg.img_size, tuple(o.crop_scale), Photometric(blur_prob=blur, solarize_prob=solarize),
                                hflip=True)
                           for blur, solarize in zip(o.blur_probs, o.solarize_probs)))  # fmt: skip

    def __init__(self, backbone: nn.Module, num_classes: int, options: Options):
        super().__init__(backbone, num_classes, options)
        o = options
        if isinstance(getattr(backbone, "global_pool", None), str) and not backbone.global_pool:
            raise UsageError("--objective mocov3 needs one feature vector per image (it projects the class token or the "
                             "pooled features), and this model returns its tokens (global_pool ''): use global_pool "
                             "token or avg in --model_kwargs.")  # fmt: skip
        vit = hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks")
        if vit:
            vit_init(backbone)
        if o.stop_grad_conv1:
            if not vit:
                raise UsageError(f"--mocov3.stop_grad_conv1 freezes a ViT's patch projection; {type(backbone).__name__} "
                                 f"has none: add --mocov3.stop_grad_conv1 false.")  # fmt: skip
            backbone.patch_embed.proj.requires_grad_(False)
        if o.sincos_pos_embed and getattr(backbone, "pos_embed", None) is not None:
            grid, dim = list(backbone.patch_embed.grid_size), backbone.pos_embed.shape[-1]
            if dim % 4:
                raise UsageError(f"--mocov3.sincos_pos_embed needs a width divisible by 4 (this model's: {dim}); "
                                 f"add --mocov3.sincos_pos_embed false.")  # fmt: skip
            with torch.no_grad():  # the class token's position stays zero, as in vits.py
                prefix = backbone.pos_embed.shape[1] - grid[0] * grid[1]
                backbone.pos_embed[:, :prefix].zero_()
                backbone.pos_embed[:, prefix:] = build_sincos2d_pos_embed(grid, dim)[None]
            backbone.pos_embed.requires_grad_(False)
        self.projector = mlp(3, backbone.num_features, o.mlp_dim, o.dim)
        self.predictor = mlp(2, o.dim, o.mlp_dim, o.dim)
        # The momentum encoder starts as the base one and gets no gradient (official builder).
        self.momentum_backbone, self.momentum_projector = copy.deepcopy(backbone), copy.deepcopy(self.projector)
        for p in [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]:
            p.requires_grad_(False)

    @torch.no_grad()
    def on_init(self, checkpoint: dict[str, torch.Tensor]) -> None:
        """The momentum encoder starts as the base one, which --init has just loaded."""
        self.momentum_backbone.load_state_dict(self.backbone.state_dict())

    def forward(self, images, labels: Optional[torch.Tensor] = None) -> StepOutput:
        o = self.options
        # Validation: the image and its mirror image as the two views (a deterministic pair), against the local
        # batch's keys only (evaluation batches may differ in size across processes). The momentum encoder is in
        # training mode whenever the base one is (official: the whole model is), so its keys use batch statistics.
        training = isinstance(images, (list, tuple))
        views = images if training else [images, images.flip(-1)]
        queries = [self.predictor(self.projector(self.backbone(self.normalize(v)))) for v in views]
        with torch.no_grad():
            keys = [self.momentum_projector(self.momentum_backbone(self.normalize(v))).float() for v in views]
            keys = [gather_keys(k) for k in keys] if training else keys
        (l1, hit1), (l2, hit2) = contrastive(queries[0], keys[1], o.temperature), contrastive(queries[1], keys[0], o.temperature)
        loss = 2 * o.temperature * (l1 + l2)
        infonce = (l1 + l2).detach() / 2  # ln(global batch) for features that tell no image from another
        accuracy = (hit1 + hit2) / 2  # per image: its other view's key is its nearest
        logs = {"infonce": infonce, "accuracy": accuracy.mean()}
        outputs = {"loss": loss.detach().expand(len(accuracy)), "accuracy": accuracy}
        return StepOutput(loss, logs, outputs)

    def make_metrics(self):
        import torchmetrics

        return torchmetrics.MetricCollection({k: torchmetrics.MeanMetric() for k in ("loss", "accuracy")})

    def update_metrics(self, metrics, outputs: dict[str, torch.Tensor]) -> None:
        for k in ("loss", "accuracy"):
            metrics[k].update(outputs[k])

    @torch.no_grad()
    def on_optimizer_step(self, progress: Progress) -> None:
        """The momentum encoder: m * momentum + (1 - m) * base, with the momentum the official adjust_moco_momentum
        gives the next iteration (cosine from `momentum` to 1 over training), applied after this step's update as
        the official code applies it before the next forward."""
        o = self.options
        m = o.momentum
        if o.momentum_cos:
            m = 1 - 0.5 * (1 + math.cos(math.pi * min(progress.step, progress.max_steps) / progress.max_steps)) * (1 - o.momentum)
        for t, s in zip([*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()],
                        [*self.backbone.parameters(), *self.projector.parameters()]):  # fmt: skip
            t.lerp_(s.detach(), 1 - m)
