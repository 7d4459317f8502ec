"""Evaluators that the training loop runs (big_vision's ``evals``): named in ``--evals``, each on its schedule.

    val       the objective's validation metrics (and the EMA weights', when kept), every --eval_steps and at
              the end, plus the objective's figure (e.g. the masked-patch mosaic)
    fewshot   1/5/10/25-shot linear accuracy of the frozen backbone (paper section 4.1) every --fewshot_steps,
              whatever --eval_steps is (None: at the end only; 0: never)

An evaluator takes the loop's state and the step and returns {"val/<metric>": value}.
"""

from __future__ import annotations

from typing import Callable

import torch


def _forked_rng(accelerator):
    """Evaluation draws its randomness (e.g. which patches are corrupted) from a fixed seed, so evaluations
    compare across steps and runs, and training's own RNG stream is left as it was."""
    return torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else [])


@torch.no_grad()
def objective_metrics(state, model, prefix: str = "val/", loader=None) -> dict:
    """The objective's metrics on the validation split (or `loader`'s), each process on its shard of the prepared
    loader; step outputs are gathered (gather_for_metrics drops the padding of the last batch) and scored everywhere."""
    accelerator, cfg = state.accelerator, state.cfg
    metrics = model.make_metrics().to(accelerator.device)
    for metric in metrics.values():
        metric.sync_on_compute = False  # its inputs are already gathered from every process
    was_training = model.training
    model.eval()
    with _forked_rng(accelerator), accelerator.autocast():
        torch.manual_seed(cfg.seed + 1)
        for i, batch in enumerate(state.val_loader if loader is None else loader):
            if cfg.eval_batches is not None and i >= cfg.eval_batches and loader is None:
                break
            out = model(batch["image"].float().div_(255), batch["label"])
            model.update_metrics(metrics, accelerator.gather_for_metrics(out.outputs))
        result = {f"{prefix}{k}": float(v) for k, v in metrics.compute().items()}
    model.train(was_training)
    return result


@torch.no_grad()
def validate(state, step: int) -> dict:
    accelerator = state.accelerator
    result = objective_metrics(state, state.unwrapped)
    if state.ema is not None:
        result |= objective_metrics(state, state.ema.module, prefix="val/ema_")
    if accelerator.is_main_process:
        val = state.splits.val
        first = torch.stack([val[i]["image"] for i in range(min(16, len(val)))]).to(accelerator.device)
        was_training = state.unwrapped.training
        state.unwrapped.eval()
        with _forked_rng(accelerator), accelerator.autocast():
            torch.manual_seed(state.cfg.seed + 1)
            state.unwrapped.on_evaluate(first.float().div_(255), state.output_dir / "figures", step)
        state.unwrapped.train(was_training)
    return result


def fewshot(state, step: int) -> dict:
    """Few-shot linear accuracy and 20-NN accuracy (plain and DINO's weighted vote) of the frozen backbone the objective
    releases (released_backbone: the backbone, or a momentum teacher), on the validation split (the main process
    computes)."""
    from ssvit.features import evaluate_backbone, representation_for

    accelerator, cfg, model = state.accelerator, state.cfg, state.unwrapped
    result = {}
    if not state.splits.num_classes:
        accelerator.print("Few-shot evaluation skipped: the data has no labels to fit or score a linear classifier on.")
        return result
    if accelerator.is_main_process:
        was_training = model.training
        with _forked_rng(accelerator), accelerator.autocast():
            rep = representation_for(cfg.objective, cfg.fewshot_representation)
            out = evaluate_backbone(model.released_backbone(), state.splits, rep, probe=False, max_train=2000,
                                    device=accelerator.device, batch_size=max(cfg.batch_size, 64))  # fmt: skip
        model.train(was_training)
        result = {f"val/{k}": v for k, v in out.items() if k.startswith(("fewshot", "knn")) and not k.endswith("_std")}
    accelerator.wait_for_everyone()
    return result


def test(state) -> dict:
    """The objective's metrics on the test split, once, at the end of a run (every batch): the numbers a study
    reports, from a split that no choice was made on. The EMA weights' too, when kept."""
    if state.test_loader is None:
        return {}
    result = objective_metrics(state, state.unwrapped, "test/", state.test_loader)
    if state.ema is not None:
        result |= objective_metrics(state, state.ema.module, "test/ema_", state.test_loader)
    return result


def _due(every, step: int, last: int) -> bool:
    return every != 0 and (step == last or (every is not None and step % every == 0))


EVALUATORS: dict[str, tuple[Callable, Callable]] = {
    # name: (evaluator, is it due at (cfg, step)?)
    "val": (validate, lambda cfg, step: _due(cfg.eval_steps, step, cfg.max_steps)),
    "fewshot": (fewshot, lambda cfg, step: _due(cfg.fewshot_steps, step, cfg.max_steps)),  # its own schedule
}
