"""Benchmark one training step against the hardware's limit and against peers, side by side (not a test).

    python -m ssvit.bench                                   # ViT-Ti/4 on 32px, masked_patch, fp32 and bf16, CPU
    python -m ssvit.bench --precision bf16 --batch_size 256 --out bench.json
    python -m ssvit.bench --model vit_base_patch16_224 --model_kwargs '{}' --img_size 224 --device cuda --precision bf16
    python -m ssvit.bench --end_to_end                     # a real pretrain.py run against the bare step
    python -m ssvit.bench --pipeline --img_size 224         # the input pipeline on real photographs

For each precision it reports training images/s (median of timed windows after warm-up), model FLOPs per
image counted with torch.utils.flop_counter.FlopCounterMode on one training step, achieved FLOP/s and model
FLOPs utilisation (MFU) against the peak: on a GPU the datasheet dense bf16 peak, on a CPU the matrix-multiply
FLOP/s measured in the same run at the same precision. Also: peak memory, the input pipeline's images/s on
its own, the step split into data wait, forward, backward and optimizer, and peers with the same encoder,
batch and precision: a plain timm supervised step, and Hugging Face transformers' ViTForMaskedImageModeling
step (when transformers is installed: `pip install -e .[bench]`).
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from ssvit.objectives import get as get_objective
from ssvit.config import DEFAULT_MODEL_KWARGS, TrainConfig
from ssvit.data import TensorImages, augmentation, synthetic_images
from ssvit.cli import make_parser, parse_args
from ssvit.errors import UsageError, command
from ssvit.models import create_backbone, set_fused_attention
from ssvit.train import make_optimizer, train_step

GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 datasheet FLOP/s (SXM)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def matmul_peak(device, precision, n=2048, reps=10) -> float:
    """Best FLOP/s of an n x n matrix multiply at this precision on this device."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def time_steps(step, device, warmup=3, windows=5, steps_per_window=5) -> tuple[float, dict]:
    """Median seconds per step over timed windows, and the median phase split of the last window's steps."""
    for _ in range(warmup):
        step()
    per_step, phases = [], []
    for _ in range(windows):
        sync(device)
        t = time.perf_counter()
        for _ in range(steps_per_window):
            phases.append(step())
        sync(device)
        per_step.append((time.perf_counter() - t) / steps_per_window)
    split = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    return statistics.median(per_step), split


def make_step(loss_fn, params, images, labels, device, precision, fused=None):
    """One training step with AdamW; returns the time of its forward, backward and optimizer phases."""
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if fused else {}))

    def step():
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, precision):
            loss = loss_fn(images, labels)
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        return {"forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": time.perf_counter() - t2}

    return step


def count_flops(loss_fn, images, labels, device, precision) -> float:
    with FlopCounterMode(display=False) as counter:
        with autocast(device, precision):
            loss = loss_fn(images, labels)
        loss.backward()
    return counter.get_total_flops()


def input_pipeline_rate(img_size, batch_size, seconds=3.0) -> float:
    """Images/s of the training input pipeline alone (uint8 cache + random resized crop + flip, 1 process)."""
    images, labels = synthetic_images(2048, img_size)
    ds = TensorImages(images, labels, img_size, augment=augmentation(img_size))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        for batch in loader:
            batch["image"].float().div_(255)
            n += len(batch["image"])
            if time.perf_counter() - t >= seconds:
                break
    return n / (time.perf_counter() - t)


def peers(args, device):
    """Loss functions of the peers, with the same encoder size, batch and precision."""
    out = {}
    timm_model = create_backbone(args.model, args.img_size, args.model_kwargs).to(device)
    timm_model.reset_classifier(10)
    if args.compile:
        timm_model.blocks = torch.compile(timm_model.blocks)
    out["timm_supervised"] = (lambda x, y: F.cross_entropy(timm_model(x).float(), y), list(timm_model.parameters()))
    if "dino" in args.objective and "lightly" in args.peers:
        out |= lightly_dino(args, device)
    if "mocov3" in args.objective and "lightly" in args.peers:
        out |= lightly_mocov3(args, device)
    try:
        from transformers import ViTConfig, ViTForMaskedImageModeling
    except ImportError:
        return out
    if "transformers" not in args.peers:
        return out
    b = timm_model
    cfg = ViTConfig(hidden_size=b.embed_dim, num_hidden_layers=len(b.blocks), num_attention_heads=b.blocks[0].attn.num_heads,
                    intermediate_size=b.blocks[0].mlp.fc1.out_features, image_size=args.img_size,
                    patch_size=args.img_size // b.patch_embed.grid_size[0], encoder_stride=args.img_size // b.patch_embed.grid_size[0])  # fmt: skip
    hf = ViTForMaskedImageModeling(cfg).to(device)
    n = b.patch_embed.num_patches

    def hf_loss(x, y):
        mask = torch.rand(len(x), n, device=device).argsort(1) < n // 2
        return hf(pixel_values=x, bool_masked_pos=mask).loss

    out["transformers_mim"] = (hf_loss, list(hf.parameters()))
    if "mae" in args.objective:  # Hugging Face's MAE with ssvit's encoder and default decoder sizes
        from transformers import ViTMAEConfig, ViTMAEForPreTraining

        mae = get_objective("mae").Options()
        mae_cfg = ViTMAEConfig(**{k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                               "intermediate_size", "image_size", "patch_size")},
                               decoder_hidden_size=mae.decoder_embed_dim, decoder_num_hidden_layers=mae.decoder_depth,
                               decoder_num_attention_heads=mae.decoder_num_heads, decoder_intermediate_size=4 * mae.decoder_embed_dim,
                               mask_ratio=mae.mask_ratio, norm_pix_loss=mae.norm_pix_loss)  # fmt: skip
        hf_mae = ViTMAEForPreTraining(mae_cfg).to(device)
        out["transformers_mae"] = (lambda x, y: hf_mae(pixel_values=x).loss, list(hf_mae.parameters()))
    return out


def defaults_of(args, name: str):
    """An objective's class, the bench's model as a TrainConfig, and the objective's default options: what a peer is
    built to match."""
    cls = get_objective(name)
    return cls, TrainConfig(objective=name, model=args.model, model_kwargs=args.model_kwargs, img_size=args.img_size), cls.Options()


def lightly_dino(args, device) -> dict:
    """lightly's DINO components (DINOProjectionHead, DINOLoss, update_momentum, cancel_last_layer_gradients) on the
    same timm backbone, views, head sizes and temperatures as ssvit's default DINO, used as lightly's DINO example
    uses them: the teacher updated before each forward, one forward per view."""
    try:
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad, update_momentum
    except ImportError:
        return {}
    import copy

    dino, cfg, o = defaults_of(args, "dino")
    backbone = create_backbone(args.model, args.img_size, {**args.model_kwargs, **dino.backbone_kwargs(cfg, o)}).to(device)
    make_head = lambda **kw: DINOProjectionHead(backbone.num_features, o.hidden_dim, o.bottleneck_dim, o.out_dim, **kw).to(device)  # noqa: E731
    head, teacher_head = make_head(freeze_last_layer=1), make_head()  # its weight_norm cannot be deep-copied
    teacher_head.load_state_dict(head.state_dict())
    teacher = copy.deepcopy(backbone)
    deactivate_requires_grad(teacher)
    deactivate_requires_grad(teacher_head)
    criterion = DINOLoss(o.out_dim, o.warmup_teacher_temp, o.teacher_temp, 30, o.student_temp, o.center_momentum).to(device)
    views = [v.to(device) for v in dino.views(cfg, o).example(args.batch_size)]

    def loss(x, y):
        update_momentum(backbone, teacher, m=o.momentum_teacher)
        update_momentum(head, teacher_head, m=o.momentum_teacher)
        with torch.no_grad():
            teacher_out = [teacher_head(teacher(v)) for v in views[: o.global_crops]]
        student_out = [head(backbone(v)) for v in views]
        return criterion(teacher_out, student_out, epoch=0)

    return {"lightly_dino": (loss, [*backbone.parameters(), *head.parameters()])}


def lightly_mocov3(args, device) -> dict:
    """lightly's components for MoCo v3 (ProjectionHead blocks as the 3-layer projector, BYOLPredictionHead,
    NTXentLoss without memory bank over the gathered batch, update_momentum) on the same timm backbone, views, widths
    and temperature as ssvit's default MoCo v3, its patch projection frozen as ssvit's: the momentum encoder updated
    before each forward, as lightly's MoCo example does; the two symmetrised terms."""
    try:
        from lightly.loss import NTXentLoss
        from lightly.models.modules.heads import BYOLPredictionHead, ProjectionHead
        from lightly.models.utils import deactivate_requires_grad, update_momentum
    except ImportError:
        return {}
    import copy

    moco, cfg, o = defaults_of(args, "mocov3")
    backbone = create_backbone(args.model, args.img_size, args.model_kwargs).to(device)
    backbone.patch_embed.proj.requires_grad_(False)
    d, h = backbone.num_features, o.mlp_dim
    projector = ProjectionHead([(d, h, torch.nn.BatchNorm1d(h), torch.nn.ReLU()), (h, h, torch.nn.BatchNorm1d(h), torch.nn.ReLU()),
                                (h, o.dim, torch.nn.BatchNorm1d(o.dim, affine=False), None)]).to(device)  # fmt: skip
    predictor = BYOLPredictionHead(o.dim, h, o.dim).to(device)
    momentum_backbone, momentum_projector = copy.deepcopy(backbone), copy.deepcopy(projector)
    deactivate_requires_grad(momentum_backbone)
    deactivate_requires_grad(momentum_projector)
    criterion = NTXentLoss(temperature=o.temperature, gather_distributed=True)
    views = [v.to(device) for v in moco.views(cfg, o).example(args.batch_size)]

    def loss(x, y):
        update_momentum(backbone, momentum_backbone, m=o.momentum)
        update_momentum(projector, momentum_projector, m=o.momentum)
        queries = [predictor(projector(backbone(v))) for v in views]
        with torch.no_grad():
            keys = [momentum_projector(momentum_backbone(v)) for v in views]
        return criterion(queries[0], keys[1]) + criterion(queries[1], keys[0])

    return {"lightly_mocov3": (loss, [p for m in (backbone, projector, predictor) for p in m.parameters() if p.requires_grad])}


def ssvit_candidate(args, device, precision, images, labels, fused_optimizer, objective=None):
    """ssvit's own training step, the loop's: the objective built as training builds it (ssvit.train.build_objective),
    prepared by Accelerate at this precision, timm's parameter groups, AdamW, the schedule, gradient clipping at the
    default norm, and every hook of the objective, all through ssvit.train.train_step."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import send_to_device

    from ssvit.config import parse
    from ssvit.train import Trainer, build_objective, example_batch, inputs, make_scheduler

    # Accelerate keeps one precision per process; the benchmark measures several in one run. Accelerate has no
    # public way to start its process-wide state again: _reset_state is what its own test utilities call.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=device.type == "cpu")
    torch.manual_seed(0)
    objective = objective or args.objective[0]
    run = parse(["--objective", objective, "--model", args.model, "--model_kwargs", json.dumps(args.model_kwargs),
                 "--img_size", str(args.img_size), "--max_steps", str(10**6), "--fused_optimizer", str(fused_optimizer).lower()])  # fmt: skip
    cfg = run.train
    model = build_objective(run, num_classes=10).to(device)
    if args.compile:  # the transformer blocks, where the time goes (the corruption hook stays eager)
        model.backbone.blocks = torch.compile(model.backbone.blocks)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    fused = set_fused_attention(model, args.fused_attn, device.type, precision)
    optimizer = make_optimizer(model, cfg, cfg.lr, device.type)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    trainer = Trainer(run=run, accelerator=accelerator, model=prepared, unwrapped=model, optimizer=optimizer,
                      scheduler=make_scheduler(optimizer, cfg), steps_per_epoch=10**3)  # fmt: skip
    batch = send_to_device(example_batch(run, len(images)), device)  # a multi-crop objective: a batch of each of its views
    batch["image"] = batch["image"] if isinstance(batch["image"], list) else batch["image"].contiguous(memory_format=fmt)

    def step():
        phases, last = {}, [time.perf_counter()]

        def mark(phase):
            sync(device)
            now = time.perf_counter()
            phases[f"{phase}_s"], last[0] = now - last[0], now

        train_step(trainer, batch, mark)
        return phases

    flops = count_flops(lambda a, b: model(*inputs(batch)).loss, images, labels, device, precision)
    model.zero_grad(set_to_none=True)
    return step, flops, fused


def measure(step, flops_per_image: float, peak, args, device) -> dict:
    """Images/s, FLOP/s, MFU, phase split and peak memory of one candidate's training step."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, split = time_steps(step, device, windows=args.windows)
    ips = args.batch_size / seconds
    return {
        "images_per_s": ips,
        "flops_per_image": flops_per_image,
        "achieved_flops": flops_per_image * ips,
        "mfu": flops_per_image * ips / peak if peak else None,
        "step_split_s": {"data_wait_s": 0.0, **split},
        "peak_memory_mb": (torch.cuda.max_memory_allocated() if device.type == "cuda" else
                           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,  # fmt: skip
    }


def run(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.rand(args.batch_size, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    # The optimizer as training picks it (--fused_optimizer), the same for every candidate.
    fused_optimizer = args.fused_optimizer if args.fused_optimizer is not None else device.type == "cuda"
    candidates = peers(args, device)
    report = {
        "machine": platform.processor() or platform.machine(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model": args.model,
        "model_kwargs": args.model_kwargs,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "compile": args.compile,
        "fused_optimizer": fused_optimizer,
        "channels_last": args.channels_last,
        "date": time.strftime("%Y-%m-%d"),
        "input_pipeline_images_per_s": input_pipeline_rate(args.img_size, args.batch_size),
        "results": {},
    }
    for precision in args.precision:
        # ssvit's attention path as training picks it (--fused_attn); the peers keep their defaults.
        steps = {}
        for name in args.objective:  # side by side in one run: the same peak, machine state and inputs
            step, flops, fused = ssvit_candidate(args, device, precision, images, labels, fused_optimizer, name)
            steps[f"ssvit_{name}"] = (step, flops)
        if device.type == "cuda":
            name = torch.cuda.get_device_name()
            peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
            peak_source = "datasheet dense bf16"
        else:
            peak, peak_source = matmul_peak(device, precision), f"measured {precision} matmul"
        for name, (loss_fn, params) in candidates.items():
            flops = count_flops(loss_fn, images, labels, device, precision)
            for p in params:
                p.grad = None
            steps[name] = (make_step(loss_fn, params, images, labels, device, precision, fused_optimizer), flops)
        rows = {name: measure(step, flops / args.batch_size, peak, args, device) for name, (step, flops) in steps.items()}
        first = args.objective[0]
        ours = rows[f"ssvit_{first}"]
        ratios = {
            "mfu": ours["mfu"],
            "time_vs_timm_supervised": rows["timm_supervised"]["images_per_s"] / ours["images_per_s"],
            "input_pipeline_vs_step": report["input_pipeline_images_per_s"] / ours["images_per_s"],
        }
        for name in args.objective[1:]:  # each further objective against the first: speed, and MFU (FLOPs as counted)
            other = rows[f"ssvit_{name}"]
            ratios[f"{name}_images_per_s_vs_{first}"] = other["images_per_s"] / ours["images_per_s"]
            ratios[f"{name}_mfu_vs_{first}"] = other["mfu"] / ours["mfu"] if ours["mfu"] else None
        if "transformers_mim" in rows:
            ratios["speedup_vs_transformers_mim"] = ours["images_per_s"] / rows["transformers_mim"]["images_per_s"]
        for name, peer in (("mae", "transformers_mae"), ("simmim", "transformers_mim"), ("dino", "lightly_dino"), ("mocov3", "lightly_mocov3")):  # each objective against its peer
            if f"ssvit_{name}" in rows and peer in rows:
                ratios[f"{name}_speedup_vs_{peer}"] = rows[f"ssvit_{name}"]["images_per_s"] / rows[peer]["images_per_s"]
        report["results"][precision] = {"peak_flops": peak, "peak_source": peak_source, "ssvit_fused_attn": fused,
                                        "steps": rows, "ratios": ratios}  # fmt: skip
    return report


# ----------------------------------------------------------------------------------------------------------
# A real training run against the bare step (--end_to_end)


def end_to_end(args) -> dict:
    """For each objective of --objective: images/s of a real ssvit/pretrain.py run (its train(), with data loading, the
    loop, the scheduler, logging: all of it) against the bare train_step on the same model, batch and precision, in one
    process, one after the other. The difference is what the loop and the input pipeline cost. Windows of
    --logging_steps steps; the first window (warm-up) is left out of both."""
    device = torch.device(args.device)
    from ssvit.train import cpu_has_bf16

    precision = "bf16" if "bf16" in args.precision and (device.type == "cuda" or cpu_has_bf16()) else "fp32"
    rows = {name: end_to_end_row(args, device, precision, name) for name in args.objective}
    return {
        "objectives": rows, "precision": precision, "data": args.end_to_end, "model": args.model,
        "model_kwargs": args.model_kwargs, "img_size": args.img_size, "batch_size": args.batch_size,
        "steps_per_window": args.logging_steps, "dataloader_num_workers": args.dataloader_num_workers, "device": args.device, "cpu": _cpu_name(),
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip


def end_to_end_row(args, device, precision: str, objective: str) -> dict:
    import tempfile

    from accelerate.state import AcceleratorState

    from ssvit.config import parse
    from ssvit.train import train

    torch.manual_seed(0)
    images = torch.rand(args.batch_size, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    fused_optimizer = args.fused_optimizer if args.fused_optimizer is not None else device.type == "cuda"
    step, _, _ = ssvit_candidate(args, device, precision, images, labels, fused_optimizer, objective)
    seconds, _ = time_steps(step, device, windows=args.windows, steps_per_window=args.logging_steps)
    bare = args.batch_size / seconds
    AcceleratorState._reset_state(reset_partial_state=True)  # as above: no public reset exists
    with tempfile.TemporaryDirectory() as tmp:
        steps = args.logging_steps * (args.windows + 1)
        train(parse(["--objective", objective, "--model", args.model, "--model_kwargs", json.dumps(args.model_kwargs),
                     "--img_size", str(args.img_size), "--batch_size", str(args.batch_size), "--data", args.end_to_end,
                     "--max_steps", str(steps), "--warmup_steps", str(steps // 10), "--logging_steps", str(args.logging_steps),
                     "--eval_steps", str(10**9), "--fewshot_steps", "0", "--save_steps", str(10**9), "--report_to", "[]",
                     "--mixed_precision", "bf16" if precision == "bf16" else "no", "--output_dir", f"{tmp}/run",
                     *([] if args.dataloader_num_workers is None else ["--dataloader_num_workers", str(args.dataloader_num_workers)])]))  # fmt: skip
        windows = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
        rates = [w["train/images_per_s"] for w in windows if "train/images_per_s" in w][1:]
        wait = [w["train/data_wait_fraction"] for w in windows if "train/data_wait_fraction" in w][1:]
    real = statistics.median(rates)
    return {"bare_step_images_per_s": bare, "pretrain_run_images_per_s": real, "overhead": 1 - real / bare,
            "data_wait_fraction": statistics.median(wait), "windows": len(rates)}  # fmt: skip


def format_end_to_end(r: dict) -> str:
    lines = [f"{r['device']} ({r['cpu']}, {r['threads']} threads), {r['model']} {r['model_kwargs']} at {r['img_size']} px, "
             f"batch {r['batch_size']}, {r['precision']}, data {r['data']}, median of windows of {r['steps_per_window']} "
             f"steps, {r['date']}", "",
             "| objective | bare train_step images/s | ssvit/pretrain.py images/s | overhead | waiting for data |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {name} | {o['bare_step_images_per_s']:.1f} | {o['pretrain_run_images_per_s']:.1f} | {o['overhead']:.1%} | "
              f"{o['data_wait_fraction']:.1%} |" for name, o in r["objectives"].items()]  # fmt: skip
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# What the paper's recipe costs (--cost)

PRESETS = ("vit_b16_mpp_imagenet", "vit_l16_mpp_imagenet", "vit_h14_mpp_imagenet")
PAPER_IMAGES = 1_000_000 * 4096  # App. B.1.2: 1M steps at batch 4096


def cost(args) -> dict:
    """FLOPs of one training image of each ImageNet preset, counted with FlopCounterMode on this machine (forward,
    backward), and what the preset's budget and the paper's cost on GPUs at --assumed_mfu of --gpu_peak: an
    estimate until a GPU run measures the step, and labelled so."""
    from ssvit.config import parse
    from ssvit.train import build_objective

    root = Path(__file__).resolve().parents[1] / "configs"
    rows = {}
    for name in PRESETS:
        run = parse(["--config", str(root / f"{name}.yaml")])
        cfg = run.train
        model = build_objective(run, num_classes=10)
        images = torch.rand(1, 3, cfg.img_size, cfg.img_size)
        flops = count_flops(lambda a, b: model(a, b).loss, images, torch.zeros(1, dtype=torch.long), torch.device("cpu"), "fp32")
        preset_images = cfg.max_steps * cfg.batch_size
        per_gpu = args.assumed_mfu * args.gpu_peak / flops  # images/s of one GPU at that MFU
        rows[name] = {
            "model": cfg.model, "img_size": cfg.img_size, "gflops_per_image": flops / 1e9,
            "preset_images": preset_images, "preset_gpu_hours": preset_images / per_gpu / 3600,
            "paper_gpu_hours": PAPER_IMAGES / per_gpu / 3600, "images_per_s_per_gpu": per_gpu,
            "global_batch": cfg.batch_size, "lr": cfg.lr,
        }  # fmt: skip
    return {"presets": rows, "assumed_mfu": args.assumed_mfu, "gpu_peak": args.gpu_peak, "cpu": _cpu_name(),
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip


def format_cost(report: dict, gpus=(2, 8, 64), micro_batch: int = 256) -> str:
    lines = [f"FLOPs counted on {report['cpu']}, {report['date']}. GPU time ESTIMATED at {report['assumed_mfu']:.0%} MFU of "
             f"{report['gpu_peak'] / 1e12:.0f} TFLOP/s (H100 SXM dense bf16), not measured.", "",
             "| preset | GFLOP per training image | images/s per GPU (est.) | preset budget | GPU-hours (est.) | paper's 4.1B images: GPU-hours (est.) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in report["presets"].items():
        lines.append(f"| {name} ({r['model']}, {r['img_size']} px) | {r['gflops_per_image']:.1f} | {r['images_per_s_per_gpu']:,.0f} | "
                     f"{r['preset_images'] / 1e6:,.0f}M images | {r['preset_gpu_hours']:,.0f} | {r['paper_gpu_hours']:,.0f} |")  # fmt: skip
    lines += ["", f"| GPUs | batch per GPU (global 4096) | --gradient_accumulation_steps at {micro_batch} per pass | lr |", "|---|---|---|---|"]
    for n in gpus:
        per = 4096 // n
        lines.append(f"| {n} | {per} | {max(1, per // micro_batch)} | 2e-4 (global batch unchanged: no rescaling) |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The input pipeline at ImageNet resolution, per core (--pipeline)


def _seconds(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def _band_fraction(images, index: int) -> float:
    """The share of an image's rows that decode_crop decodes for the item's box (epoch 0) at full scale."""
    from ssvit import jpeg
    from ssvit.data import item_rng

    data = images.encoded(index)
    lay = jpeg.layout(data)
    if lay is None:
        return 1.0
    top, _, h, _, _ = images.augment.draw(lay.height, lay.width, item_rng(images.seed, 0, index))
    return jpeg.band(data, lay, top, top + h)[2] / lay.height


def _each(fn, items) -> None:
    """fn over items, results dropped as they come (as a loader hands them on)."""
    for item in items:
        fn(item)


def _batches(items, n: int):
    """Lists of n items (the last one shorter), as a DataLoader worker takes them."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def pipeline(args) -> dict:
    """Images/s per core of each way to get a training image (random resized crop + flip at --img_size) from the
    same photographs, side by side: timm's training transform (the baseline a user has today) over the JPEG
    folder and over ssvit's prepared shards, ssvit's loader over both and streaming the shards, and decode-only
    for each input (Pillow, as timm decodes; libjpeg-turbo through torchvision, and through simplejpeg as ssvit
    decodes). ssvit's rows are what a DataLoader worker does: items collated into batches of 64 (the batch copy
    included; timm's rows leave theirs out). The rows are timed in turn, --rounds times over, and each keeps its
    best round: on shared cores a neighbour only ever slows a round down, and every row is treated alike."""
    import io
    import tempfile

    import simplejpeg
    from PIL import Image
    from timm.data import create_transform
    from torch.utils.data import default_collate
    from torchvision.io import ImageReadMode, decode_jpeg

    from ssvit.data import HFImages, collate, load_source
    from ssvit.shards import prepare
    from ssvit.stream import streaming_splits

    torch.set_num_threads(1)
    size, n = args.img_size, args.images
    folder = load_source(args.data)["train"]
    cases, loaders = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        prepare(args.data, tmp, max_side=args.max_side, workers=1, quiet=True, limit=n)
        shards = load_source(f"parquet:{tmp}")["train"]
        timm_transform = create_transform(size, is_training=True, color_jitter=None)
        for name, ds, rows in (("folder", folder, range(min(n, len(folder)))), ("shards", shards, None)):
            ssvit = loaders[name] = HFImages(ds, "image", None, size, augment=augmentation(size, (0.08, 1.0)), rows=rows)
            raw = [bytes(ssvit.encoded(i)) for i in range(len(ssvit))]
            # name: (fn, what it is called on: encoded images, batches of keys or the stream, how many images that is)
            cases[f"decode only (Pillow), {name}"] = (lambda b: Image.open(io.BytesIO(b)).convert("RGB").load()), raw, len(raw)
            cases[f"decode only (torchvision), {name}"] = (lambda b: decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)), raw, len(raw)
            cases[f"decode only (simplejpeg), {name}"] = (lambda b: simplejpeg.decode_jpeg(b, "RGB")), raw, len(raw)
            cases[f"timm create_transform, {name}"] = (lambda b: timm_transform(Image.open(io.BytesIO(b)).convert("RGB"))), raw, len(raw)
            cases[f"ssvit, {name}"] = (lambda keys, ds=ssvit: collate([ds[(0, i)] for i in keys])), list(_batches(range(len(ssvit)), 64)), len(ssvit)
        cfg = TrainConfig(data=f"parquet:{tmp}", streaming=True, img_size=size, crop_scale=(0.08, 1.0), val_fraction=0.01)
        stream = streaming_splits(cfg, 0, 1, micro_batch=1).train
        stream.set_workers(1)
        cases["ssvit streaming, shards"] = (lambda s: _each(collate, _batches(s, 64))), [stream], len(stream)
        on_shards = loaders["shards"]
        batch = [on_shards[(0, i)] for i in range(min(64, len(on_shards)))]
        collation = {"torch default_collate": default_collate, "ssvit collate": collate}
        collate_ms = {name: 1e3 * min(_seconds(fn, batch) for _ in range(5)) / len(batch) for name, fn in collation.items()}
        rows_decoded = statistics.mean(_band_fraction(on_shards, i) for i in range(len(on_shards)))
        rounds = {name: [] for name in cases}
        for _ in tqdm(range(args.rounds), desc="pipeline benchmark rounds", disable=args.rounds < 2):
            for name, (fn, items, images) in cases.items():
                rounds[name].append(images / _seconds(_each, fn, items))
    rows = {name: max(r) for name, r in rounds.items()}
    fastest = rows["ssvit, shards"]
    decode = max(v for k, v in rows.items() if k.startswith("decode only") and k.endswith("shards"))
    return {
        "images_per_s_per_core": rows,
        "rounds": rounds,
        "ratios": {
            "ssvit_shards_vs_timm_folder": fastest / rows["timm create_transform, folder"],
            "ssvit_folder_vs_timm_folder": rows["ssvit, folder"] / rows["timm create_transform, folder"],
            "ssvit_shards_vs_fastest_decode_only_shards": fastest / decode,
            "ssvit_shards_vs_pillow_decode_only_shards": fastest / rows["decode only (Pillow), shards"],
            "ssvit_streaming_vs_ssvit_shards": rows["ssvit streaming, shards"] / fastest,
        },
        "cores_per_gpu_for_3000_images_per_s": 3000 / fastest,
        "rows_decoded_by_bands_on_the_shards": rows_decoded,
        "collate_ms_per_image": collate_ms,
        "images": n, "img_size": size, "max_side": args.max_side, "data": args.data,
        "cpu": _cpu_name(), "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip


def format_pipeline(report: dict) -> str:
    lines = [f"{report['cpu']}, 1 thread, {report['images']} images of {report['data']} at {report['img_size']} px "
             f"(shards: shorter side {report['max_side']} px), best of {len(next(iter(report['rounds'].values())))} rounds, {report['date']}", "", "| pipeline | images/s per core |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v:.0f} |" for k, v in report["images_per_s_per_core"].items()]
    lines += ["", ", ".join(f"{k} {v:.2f}" for k, v in report["ratios"].items()),
              f"cores per GPU to feed a ViT-B/16 at 3,000 images/s: {report['cores_per_gpu_for_3000_images_per_s']:.1f}",
              f"rows of the shards' images decoded for the crops (row bands): {report['rows_decoded_by_bands_on_the_shards']:.0%}",
              "collation, ms per image: " + ", ".join(f"{k} {v:.3f}" for k, v in report["collate_ms_per_image"].items())]  # fmt: skip
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def format_report(report: dict) -> str:
    lines = [f"{report['device']} ({report['cpu']}, {report['threads']} threads), {report['model']} {report['model_kwargs']} "
             f"at {report['img_size']}px, batch {report['batch_size']}, {report['date']}",  # fmt: skip
             f"input pipeline: {report['input_pipeline_images_per_s']:.0f} images/s", ""]
    lines.append("| precision | step | images/s | GFLOP/image | achieved TFLOP/s | MFU | fwd / bwd / opt ms |")
    lines.append("|---|---|---|---|---|---|---|")
    for precision, r in report["results"].items():
        for name, row in r["steps"].items():
            split = row["step_split_s"]
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
            lines.append(f"| {precision} | {name} | {row['images_per_s']:.1f} | {row['flops_per_image'] / 1e9:.3f} | "
                         f"{row['achieved_flops'] / 1e12:.3f} | {mfu} | {split['forward_s'] * 1e3:.0f} / "
                         f"{split['backward_s'] * 1e3:.0f} / {split['optimizer_s'] * 1e3:.0f} |")  # fmt: skip
        ratio = ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items() if v is not None)
        lines.append(f"| {precision} | peak {r['peak_flops'] / 1e12:.3f} TFLOP/s ({r['peak_source']}) | {ratio} | | | | |")
    return "\n".join(lines)


def run_command(argv=None) -> dict:
    p = make_parser("ssvit-bench", __doc__)
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--model_kwargs", type=Optional[dict], default=DEFAULT_MODEL_KWARGS["vit_tiny_patch16_224"],
                   help="default: the training default (ViT-Ti/4, 6 blocks)")
    p.add_argument("--img_size", type=int, default=32)
    p.add_argument("--objective", nargs="+", default=["masked_patch"],
                   help="one or more objectives, timed side by side; ratios are against the first")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks of ssvit and timm")
    p.add_argument("--fused_attn", type=Optional[bool], default=None, help="ssvit's attention path (default: as training picks)")
    p.add_argument("--fused_optimizer", type=Optional[bool], default=None, help="fused AdamW for every step (default: on CUDA)")
    p.add_argument("--channels_last", action="store_true", help="channels_last model and images for ssvit (BiT, hybrids)")
    p.add_argument("--peers", nargs="*", default=["timm", "transformers", "lightly"], help="peers to measure beside ssvit")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--end_to_end", default=None, metavar="DATA",
                   help="time a real pretrain.py run on DATA (a --data value, e.g. parquet:/data/cifar10) against the bare step")
    p.add_argument("--logging_steps", type=int, default=10, help="with --end_to_end: steps per timed window")
    p.add_argument("--dataloader_num_workers", type=Optional[int], default=None,
                   help="with --end_to_end: the run's loader workers (default: training's; 0 augments in the training "
                        "process, so the augmentation's own cost shows as waiting for data)")
    p.add_argument("--cost", action="store_true", help="FLOPs and estimated GPU-hours of the ImageNet presets")
    p.add_argument("--assumed_mfu", type=float, default=0.4, help="with --cost: the MFU the GPU estimate assumes")
    p.add_argument("--gpu_peak", type=float, default=989e12, help="with --cost: dense bf16 FLOP/s of one GPU")
    p.add_argument("--pipeline", action="store_true", help="benchmark the input pipeline at --img_size instead of the step")
    p.add_argument("--data", default=None, help="with --pipeline: the photographs, a --data value (e.g. imagefolder:/data/imagenet/train)")
    p.add_argument("--images", type=int, default=300, help="with --pipeline: how many of them")
    p.add_argument("--max_side", type=int, default=320, help="with --pipeline: shorter side of the prepared shards")
    p.add_argument("--rounds", type=int, default=5, help="with --pipeline: time every row this many times, keep the best")
    args = parse_args(p, argv)
    if args.cost:
        report = cost(args)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(format_cost(report))
        return report
    if args.end_to_end:
        report = end_to_end(args)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(format_end_to_end(report))
        return report
    if args.pipeline:
        if args.data is None:
            raise UsageError("--pipeline times decoding real photographs: name them with --data, e.g. --data imagefolder:DIR.")
        report = pipeline(args)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(format_pipeline(report))
        return report
    from ssvit.train import cpu_has_bf16

    if args.device == "cpu" and "bf16" in args.precision and not cpu_has_bf16():
        print("This CPU has no bf16 matrix units (AVX512-BF16 or AMX): PyTorch emulates bf16 hundreds of times slower "
              "than fp32, so bf16 is left out of this benchmark.")  # fmt: skip
        args.precision = [p for p in args.precision if p != "bf16"] or ["fp32"]
    report = run(args)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"\nWritten: {args.out}")
    return report


main = command("ssvit-bench")(run_command)


if __name__ == "__main__":
    main()
