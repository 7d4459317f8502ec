"""Look inside a ViT checkpoint: the figures of the ViT paper's section 4.5 (figure 7), computed on real images.

    python -m ssvit.figures runs/cifar10_mpp_cpu/checkpoints/step_001500 --out inspect/mpp

Writes PNGs a person can open and the numbers behind each (JSON / .npy):
1. patch_embedding_pca.png   the first principal components of the patch-embedding filters, as RGB patches
2. position_similarity.png   cosine similarity of each position embedding to every other, a grid of grids
3. attention_distance.png    mean attention distance of each head against depth
4. attention_rollout.png     attention rollout (Abnar & Zuidema, 2020) over example validation images
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from ssvit.config import saved_train_config
from ssvit.cli import make_parser, parse_args
from ssvit.errors import UsageError, command
from ssvit.models import build_timm_model


def patch_embedding_components(weight: torch.Tensor, n: int = 28) -> torch.Tensor:
    """Principal components of the (D, 3, p, p) patch-embedding filters: (n, 3, p, p), each scaled to [0, 1]."""
    flat = rearrange(weight.float(), "d c h w -> d (c h w)")
    _, _, v = torch.linalg.svd(flat - flat.mean(0), full_matrices=False)
    comps = rearrange(v[:n], "n (c h w) -> n c h w", c=weight.shape[1], h=weight.shape[2])
    lo, hi = comps.amin((1, 2, 3), keepdim=True), comps.amax((1, 2, 3), keepdim=True)
    return (comps - lo) / (hi - lo).clamp(min=1e-8)


def position_similarity(pos_embed: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """Cosine similarity between position embeddings of patches: (gh, gw, gh, gw)."""
    pos = F.normalize(pos_embed[0, num_prefix:].float(), dim=-1)
    return rearrange(pos @ pos.T, "(a b) (c d) -> a b c d", a=grid[0], c=grid[0])


def mean_attention_distance(attn: torch.Tensor, grid: tuple[int, int], patch_px: float) -> torch.Tensor:
    """Per head, the attention-weighted distance in pixels between a query patch and the patches it attends
    to, averaged over query patches and images (paper, figure 7 right). attn: (B, H, N, N) over patch tokens
    only; rows are renormalised to sum to 1 over patches."""
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([ys.flatten(), xs.flatten()], -1).float() * patch_px
    dist = torch.cdist(centres, centres)  # (N, N)
    attn = attn.float() / attn.float().sum(-1, keepdim=True)
    return (attn * dist.to(attn.device)).sum(-1).mean((0, 2))


def attention_rollout(attns: list[torch.Tensor], num_prefix: int) -> torch.Tensor:
    """Rollout over layers of head-averaged attention with the residual (0.5 A + 0.5 I); returns the class
    token's attention to each patch: (B, N)."""
    rollout = None
    for a in attns:
        a = a.float().mean(1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1])
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout[:, 0, num_prefix:]


@torch.no_grad()
def capture_attention(model, images: torch.Tensor) -> list[torch.Tensor]:
    """Softmaxed attention maps of every block, (B, H, T, T), by running timm's unfused attention path."""
    maps, hooks = [], []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o.detach().cpu())))
    try:
        model.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
    return maps


def inspect_checkpoint(checkpoint, out, num_images: int = 64) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid, save_image

    from ssvit.data import load_splits

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, _ = build_timm_model(checkpoint)
    if not hasattr(model, "blocks"):
        raise UsageError("ssvit.figures draws ViT figures; this checkpoint's model has no transformer blocks (BiT).")
    cfg = saved_train_config(checkpoint)
    prefix, grid = model.num_prefix_tokens, tuple(model.patch_embed.grid_size)
    patch_px = cfg.img_size / grid[0]
    summary = {"checkpoint": str(checkpoint), "grid": grid, "patch_px": patch_px}

    proj = model.patch_embed.proj
    if proj.weight.shape[1] == 3:  # a hybrid's projection acts on CNN features, not on RGB pixels
        comps = patch_embedding_components(proj.weight.detach())
        np.save(out / "patch_embedding_pca.npy", comps.numpy())
        save_image(F.interpolate(comps, scale_factor=max(1, 32 // comps.shape[-1]), mode="nearest"),
                   out / "patch_embedding_pca.png", nrow=7, padding=2, pad_value=1)  # fmt: skip

    sim = position_similarity(model.pos_embed.detach(), 0 if model.no_embed_class else prefix, grid)
    np.save(out / "position_similarity.npy", sim.numpy())
    tiles = rearrange(sim, "a b c d -> (a b) 1 c d")
    tiles = F.interpolate((tiles + 1) / 2, scale_factor=max(1, 24 // grid[0]), mode="nearest")
    save_image(make_grid(tiles, nrow=grid[1], padding=1, pad_value=0), out / "position_similarity.png")

    val = load_splits(cfg).val
    images = torch.stack([val[i]["image"] for i in range(min(num_images, len(val)))]).float() / 255
    mean = torch.tensor(model.pretrained_cfg.get("mean", (0.5,) * 3)).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg.get("std", (0.5,) * 3)).view(1, 3, 1, 1)
    maps = capture_attention(model, (images - mean) / std)
    distances = torch.stack([mean_attention_distance(a[:, :, prefix:, prefix:], grid, patch_px) for a in maps])
    summary["mean_attention_distance"] = distances.tolist()  # (depth, heads) in pixels
    fig, ax = plt.subplots(figsize=(5, 4))
    for h in range(distances.shape[1]):
        ax.scatter(range(1, len(distances) + 1), distances[:, h], s=12, label=f"head {h + 1}")
    ax.set(xlabel="network depth (block)", ylabel="mean attention distance (pixels)", ylim=(0, cfg.img_size),
           title="Mean attention distance per head")  # fmt: skip
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "attention_distance.png", dpi=150)
    plt.close(fig)

    rollout = attention_rollout(maps, prefix)[:8]
    heat = rearrange(rollout, "b (h w) -> b 1 h w", h=grid[0])
    heat = F.interpolate(heat / heat.amax((2, 3), keepdim=True), size=images.shape[-2:], mode="bilinear")
    np.save(out / "attention_rollout.npy", rollout.numpy())
    rows = rearrange([images[:8], images[:8] * heat], "t b c h w -> (b t) c h w")
    save_image(F.interpolate(rows, scale_factor=max(1, 96 // cfg.img_size), mode="nearest"), out / "attention_rollout.png", nrow=4)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_command(argv=None) -> dict:
    p = make_parser("ssvit-figures", __doc__)
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--num_images", type=int, default=64, help="validation images for attention distance")
    args = parse_args(p, argv)
    summary = inspect_checkpoint(args.checkpoint, args.out, args.num_images)
    print(f"Figures and numbers written to {args.out}")
    return summary


main = command("ssvit-figures")(run_command)


if __name__ == "__main__":
    main()
