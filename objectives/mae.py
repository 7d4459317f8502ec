"""MAE: masked autoencoders (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, arXiv
2111.06377), as the paper and its official code (facebookresearch/mae, models_mae.py) do it.

Per image, int(N x (1 - mask_ratio)) patches stay visible and the rest are masked, chosen by the argsort of uniform
noise (section 3, "Masking": random sampling, 75% by default; the official random_masking's len_keep). The encoder, the backbone itself, sees only the visible patches and
the class token, with their position embeddings: no mask token enters it ("MAE encoder"). A lightweight decoder
(its own blocks; fixed 2-D sine-cosine position embeddings) takes the encoded visible tokens and a shared, learned
mask token at every masked position and predicts each masked patch's pixels ("MAE decoder"). The loss is the
mean squared error on the masked patches only, against targets normalised per patch (their mean and variance:
norm_pix_loss, on by default; section 3, "Reconstruction target"). The encoder's position embeddings are the
fixed 2-D sine-cosine ones as well (the official code freezes them in pretraining); fine-tuning trains them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from ssvit.objectives import register
from ssvit.objectives.base import PatchTokens, PixelReconstruction, StepOutput, patchify, save_reconstructions
from ssvit.errors import UsageError, check_ranges


def visible_patches(n: int, ratio: float) -> int:
    """Patches kept visible per image: the official random_masking's len_keep = int(n * (1 - ratio)) (at n = 64 and
    ratio 0.6: 25 visible, 39 masked)."""
    return int(n * (1 - ratio))


def random_masking(batch: int, n: int, ratio: float, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n - visible_patches(n, ratio) masked patches per image by the argsort of uniform noise (official code:
    random_masking). Returns (keep (B, n - k): the visible patches' indices in shuffled order, restore (B, n): the
    permutation that puts [visible, masked] back in patch order, mask (B, n): 1 for masked, 0 for visible)."""
    masked = n - visible_patches(n, ratio)
    shuffle = torch.rand(batch, n, device=device).argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(batch, n, device=device)
    mask[:, : n - masked] = 0
    return shuffle[:, : n - masked], restore, mask.gather(1, restore)


def normalized_targets(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch minus its mean over its pixels, over the square root of their variance + eps (norm_pix_loss; the
    official code's unbiased variance)."""
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per patch, averaged over the masked patches only (visible ones weigh nothing)."""
    per_patch = (pred - target).pow(2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


DecoderNorm = partial(nn.LayerNorm, eps=1e-6)
"""The official decoder's LayerNorm (models_mae.py: norm_layer=partial(nn.LayerNorm, eps=1e-6))."""


@register("mae")
class MAE(PixelReconstruction):
    @dataclass
    class Options:
        mask_ratio: float = 0.75
        """Share of the patches masked per image: int(N x (1 - mask_ratio)) stay visible, as the official code keeps (paper: 75%)."""
        norm_pix_loss: bool = True
        """Targets normalised per patch by their mean and variance (paper, Table 1c: better representations)."""
        decoder_embed_dim: int = 128
        """Decoder width. Paper: 512 for ViT-B/L/H (configs/vit_b16_mae_imagenet.yaml); 128 here, for the tiny CPU
        models (ViT-Ti/4 of width 192), so that the decoder stays a small share of the step."""
        decoder_depth: int = 2
        """Decoder blocks. Paper: 8 (1 still fine-tunes as well, Table 1a); 2 here, for the tiny CPU models."""
        decoder_num_heads: int = 4
        """Decoder attention heads. Paper: 16 (at width 512)."""
        mosaic_images: int = 8
        """Validation images in the PNG written at each evaluation (0: none)."""

    @classmethod
    def check_options(cls, cfg, options: Options) -> None:
        o = options
        check_ranges([
            ("mask_ratio", o.mask_ratio, 0 < o.mask_ratio < 1, "in (0, 1) (paper: 0.75)"),
            ("decoder_embed_dim", o.decoder_embed_dim, o.decoder_embed_dim >= 4 and o.decoder_embed_dim % 4 == 0,
             "a multiple of 4, for the 2-D sine-cosine positions (paper: 512)"),
            ("decoder_depth", o.decoder_depth, o.decoder_depth >= 1, "1 or more blocks (paper: 8)"),
            ("decoder_num_heads", o.decoder_num_heads, o.decoder_num_heads >= 1, "1 or more (paper: 16)"),
            ("mosaic_images", o.mosaic_images, o.mosaic_images >= 0, "0 (no figure) or more images"),
        ], "--mae.")  # fmt: skip
        if o.decoder_embed_dim % o.decoder_num_heads:
            raise UsageError(f"--mae.decoder_embed_dim {o.decoder_embed_dim} is not divisible by --mae.decoder_num_heads "
                             f"{o.decoder_num_heads}: choose a width that is a multiple of the heads (paper: 512 and 16).")  # fmt: skip

    def __init__(self, backbone: nn.Module, num_classes: int, options: Options):
        super().__init__(backbone, num_classes, options)
        self.tokens = PatchTokens(backbone, "mae")
        o, n, dim = options, self.tokens.num_patches, backbone.embed_dim
        if not 0 < visible_patches(n, o.mask_ratio) < n:
            raise UsageError(f"--mae.mask_ratio {o.mask_ratio} keeps int({n} x (1 - {o.mask_ratio})) = {visible_patches(n, o.mask_ratio)} "
                             f"of {n} patches visible: at least one must be masked and one visible.")  # fmt: skip
        if dim % 4:
            raise UsageError(f"mae: the encoder width {dim} is not a multiple of 4, which its 2-D sine-cosine positions need.")
        # Fixed 2-D sine-cosine positions in the encoder (frozen while pretraining, as the official code does) ...
        positions = build_sincos2d_pos_embed(list(self.tokens.grid), dim)[None]  # (1, N, D), rows in raster order
        with torch.no_grad():
            self.tokens.positions().copy_(positions)
            if not backbone.no_embed_class:
                backbone.pos_embed[:, : self.tokens.num_prefix].zero_()
        backbone.pos_embed.requires_grad_(False)
        # ... and in the decoder (its class token gets none: the official code's is zero).
        width = o.decoder_embed_dim
        self.register_buffer("decoder_pos_embed", build_sincos2d_pos_embed(list(self.tokens.grid), width)[None], persistent=False)
        self.decoder_embed = nn.Linear(dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_blocks = nn.Sequential(
            *[Block(width, o.decoder_num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=DecoderNorm) for _ in range(o.decoder_depth)]
        )
        self.decoder_norm = DecoderNorm(width)
        self.decoder_pred = nn.Linear(width, self.tokens.patch**2 * 3)
        # The official initialisation of what MAE adds: xavier-uniform linear layers, normal(0.02) mask token.
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, *self.decoder_blocks.modules(), self.decoder_pred]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> StepOutput:
        """The official model's phases in order: embed and mask, encode the visible patches, decode every position,
        the loss on the masked ones."""
        x = self.normalize(images)
        visible, restore, mask = self.random_masking(x)
        pred = self.forward_decoder(self.tokens.encode(visible), restore)  # encoder: the class token and visible patches
        target, loss = self.forward_loss(x, pred, mask)
        return self.step_output(loss, pred, target, mask)

    def random_masking(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The patch embeddings with their positions, only the visible ones kept (B, n_visible, D); the permutation
        back to patch order; the mask (B, N), 1 for masked."""
        patches = self.tokens.embed(x) + self.tokens.positions()
        b, n, dim = patches.shape
        keep, restore, mask = random_masking(b, n, self.options.mask_ratio, x.device)
        return patches.gather(1, keep[..., None].expand(-1, -1, dim)), restore, mask

    def forward_decoder(self, encoded: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """The encoded visible tokens and a mask token at every masked position, put back in patch order, through the
        decoder: each patch's predicted pixels (B, N, p * p * 3)."""
        t, n = self.tokens, restore.shape[1]
        y = self.decoder_embed(encoded)
        prefix, y = y[:, : t.num_prefix], y[:, t.num_prefix :]
        y = torch.cat([y, self.mask_token.expand(len(y), n - y.shape[1], -1).to(y.dtype)], dim=1)
        y = y.gather(1, restore[..., None].expand(-1, -1, y.shape[-1])) + self.decoder_pos_embed
        y = self.decoder_norm(self.decoder_blocks(torch.cat([prefix, y], dim=1)))
        return self.decoder_pred(y[:, t.num_prefix :]).float()

    def forward_loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The targets (each patch's pixels, normalised per patch with norm_pix_loss) and the MSE on the masked patches."""
        target = patchify(x, self.tokens.patch)
        if self.options.norm_pix_loss:
            target = normalized_targets(target)
        return target, masked_mse(pred, target, mask)

    @torch.no_grad()
    def on_evaluate(self, images: torch.Tensor, out_dir: Path, step: int) -> Optional[Path]:
        """The image, its masked input and the reconstruction (ssvit.objectives.base.save_reconstructions). With
        norm_pix_loss the predicted patches are given each true patch's mean and variance back, as the paper's
        figures show them."""
        images = images[: self.options.mosaic_images]
        if len(images) == 0:
            return None
        out = self(images).outputs
        pred = out["pred"]
        if self.options.norm_pix_loss:
            true = patchify(self.normalize(images), self.tokens.patch)
            pred = pred * (true.var(-1, keepdim=True) + 1e-6) ** 0.5 + true.mean(-1, keepdim=True)
        return save_reconstructions(self, images, pred, out["mask"], out_dir / f"mae_step{step:06d}.png")
