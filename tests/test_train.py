"""The training loop end to end: outputs, supervised ViT and BiT, resume after SIGKILL, bad input."""

import json
import math
import signal
import subprocess
import time

import pytest
from safetensors.torch import load_file

from ssvit.pretrain import main

from conftest import PYTHON, ROOT, losses, subprocess_env, tiny_args


def test_masked_patch_run_writes_everything_a_person_opens(tmp_path):
    result = main(tiny_args(tmp_path, "--eval_steps", "4"))
    run = tmp_path / "run"
    assert result["steps"] == 4 and result["num_processes"] == 1
    for name in ("config.yaml", "results.json", "metrics.jsonl", "checkpoints/step_000004/model.safetensors"):
        assert (run / name).exists(), name
    assert list((run / "figures").glob("masked_patch_step000004.png"))
    saved = json.loads((run / "results.json").read_text())
    for key in ("val/color_accuracy", "val/baseline_majority", "val/baseline_context_mean", "images_per_s", "data_wait_fraction"):
        assert key in saved and math.isfinite(saved[key]), key
    assert 0 <= saved["data_wait_fraction"] < 1
    best = json.loads((run / "best/best.json").read_text())
    assert best["metric"] == "color_accuracy" and best["step"] == 4 and (run / "best/model.safetensors").exists()
    weights = load_file(run / "checkpoints/step_000004/model.safetensors")
    assert "mask_token" in weights and "backbone.pos_embed" in weights
    # The saved config repeats the run.
    main(["--config", str(run / "config.yaml"), "--output_dir", str(tmp_path / "again")])
    assert losses(tmp_path / "again") == losses(run)


def test_few_shot_evaluation_keeps_its_own_schedule(tmp_path):
    """--fewshot_steps 2 evaluates few-shot at steps 2 and 4 whatever --eval_steps is (big_vision's per-evaluator
    schedule); it needed a multiple of --eval_steps before."""
    main(tiny_args(tmp_path, "--fewshot_steps", "2", "--eval_steps", "100"))
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if any(k.startswith("val/fewshot") for k in r)] == [2, 4]
    assert [r["step"] for r in rows if "val/color_accuracy" in r] == [4]


@pytest.mark.parametrize("target", ["downsampled", "pixels"])
def test_targets_and_corruption_rate_from_configuration(tmp_path, target):
    result = main(tiny_args(tmp_path, "--max_steps", "2", "--masked_patch.target", target, "--masked_patch.mask_ratio", "0.15"))
    assert result["steps"] == 2 and math.isfinite(result["val/loss"])


def test_supervised_vit_learns_on_synthetic_data(tmp_path):
    result = main(tiny_args(tmp_path, "--max_steps", "200", "--warmup_steps", "10", "--crop_scale", "[0.8, 1.0]",
                            "--data", "synthetic:2000", "--batch_size", "32", "--fewshot_steps", "0",
                            "--eval_steps", "200", "--eval_batches", "null", objective="supervised"))  # fmt: skip
    # 10 classes: chance is 0.1. This run reached 0.345 when written (150 steps: 0.235, 300: 0.455).
    assert result["val/top1"] > 0.2


def test_supervised_bit_and_sigmoid_loss_and_ema(tmp_path):
    result = main(tiny_args(tmp_path, "--model", "resnetv2_50x1_bit", "--model_kwargs", "{}", "--max_steps", "2",
                            "--batch_size", "8", "--supervised.loss", "sigmoid", "--ema_decay", "0.9",
                            "--eval_steps", "2", objective="supervised"))  # fmt: skip
    assert result["steps"] == 2 and "val/ema_top1" in result
    assert (tmp_path / "run/checkpoints/step_000002/ema.safetensors").exists()


def test_masked_patch_on_bit_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no patch tokens|has none"):
        main(tiny_args(tmp_path, "--model", "resnetv2_50x1_bit", "--model_kwargs", "{}"))


def test_unknown_model_suggests_timm_names(tmp_path):
    with pytest.raises(ValueError, match="vit_tiny_patch16_224"):
        main(tiny_args(tmp_path, "--model", "vit_tiny_patch16_22"))


def test_image_size_not_divisible_by_patch_size(tmp_path):
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        main(tiny_args(tmp_path, "--img_size", "18"))


def test_checkpoint_from_another_model_names_the_keys(tmp_path):
    main(tiny_args(tmp_path, "--max_steps", "1"))
    ckpt = tmp_path / "run/checkpoints/step_000001"
    other = ["--model_kwargs", "{patch_size: 4, embed_dim: 48, depth: 2, num_heads: 2}"]
    with pytest.raises(ValueError, match=r"(?s)shape mismatches \(30\):.*qkv.weight: checkpoint \(96, 32\) vs model \(144, 48\)"):
        main(tiny_args(tmp_path, "--init", str(ckpt), *other, "--output_dir", str(tmp_path / "b")))
    with pytest.raises(ValueError, match="model_kwargs .* -> "):
        main(tiny_args(tmp_path, "--resume", *other))
    with pytest.raises(ValueError, match="do not fit"):  # allowed to change, a model of another shape still does not load
        main(tiny_args(tmp_path, "--resume", *other, "--allow_inexact_resume"))


def test_non_finite_loss_stops_and_writes_no_bad_checkpoint(tmp_path):
    # lr 1e12 ruins the weights in the first optimizer step: nothing may be saved, and the error says so.
    args = tiny_args(tmp_path, "--objective", "supervised", "--optimizer", "sgd", "--lr", "1e12",
                     "--max_grad_norm", "null", "--warmup_steps", "0", "--save_steps", "1", "--max_steps", "50")  # fmt: skip
    with pytest.raises(RuntimeError, match=r"non-finite \(NaN/inf\) by step 1: it was not saved.*none \(no checkpoint"):
        main(args)
    assert not list((tmp_path / "run/checkpoints").glob("step_*"))


@pytest.mark.parametrize("workers,data,objective", [(0, "cached", "masked_patch"), (2, "cached", "masked_patch"), (2, "decoded", "masked_patch"),
                                                    (2, "streaming", "masked_patch"), (2, "cached", "mae"), (2, "cached", "simmim"),
                                                    (2, "cached", "dino"), (2, "cached", "fixmatch"), (2, "cached", "joint")],
                         ids=["in_process", "two_workers", "decoded_two_workers", "streaming", "mae", "simmim", "dino", "fixmatch", "joint"])  # fmt: skip
def test_sigkill_mid_epoch_then_resume_gives_the_same_losses(tmp_path, workers, data, objective, shards, monkeypatch):
    # 540 training images at batch 16: 33 steps an epoch; checkpoints every 5 steps are mid-epoch. Decoded: the JPEG
    # shards read per image from Arrow (data beyond the uint8 cache), each crop decoded in a worker. Streamed: 235
    # training images over 2 workers, 14 steps an epoch: the same losses mean the same images in the same order.
    steps = 120 if not workers else 45
    common = ["--max_steps", str(steps), "--save_steps", "5", "--save_total_limit", "3", "--dataloader_num_workers", str(workers),
              "--objective", objective]  # fmt: skip
    if objective == "dino":  # a small head; the teacher, centre and temperature schedule resume with the run
        common += ["--dino.out_dim", "64", "--dino.hidden_dim", "32", "--dino.bottleneck_dim", "16", "--dino.local_crops", "2"]
    if objective == "fixmatch":  # two streams, each resumed where it stood: 3 labelled steps an epoch, 16 unlabeled
        common += ["--fixmatch.mu", "2", "--fixmatch.threshold", "0", "--fixmatch.teacher", "ema", "--label_fraction", "0.1"]
    if objective == "joint":  # supervised on 10% of the labels plus MAE on every image: two streams and MAE's masks
        common[-1:] = ["supervised", "--aux", "mae", "--label_fraction", "0.1"]
    if data == "decoded":
        monkeypatch.setenv("SSVIT_MAX_CACHE_BYTES", "0")  # here and in the killed subprocess
    if data != "cached":
        common += ["--data", f"parquet:{shards}"] + (["--streaming"] if data == "streaming" else [])
    main(tiny_args(tmp_path / "straight", *common))
    reference = losses(tmp_path / "straight/run")

    args = tiny_args(tmp_path / "killed", *common)
    proc = subprocess.Popen([PYTHON, "-m", "ssvit.pretrain", *args], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    first = tmp_path / "killed/run/checkpoints/step_000010"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(losses(tmp_path / "killed/run"))
    assert killed_at < steps

    result = main([*args, "--resume"])
    resumed = losses(tmp_path / "killed/run")
    assert result["steps"] == steps and ("decoded per image" in result["data"]) == (data == "decoded")
    after = [s for s in reference if s > 10]
    assert [resumed[s] for s in after] == [reference[s] for s in after]  # exact in fp32 on CPU
    logged = [json.loads(line)["step"] for line in (tmp_path / "killed/run/metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert logged == list(range(1, steps + 1))  # each step once: what the killed run logged after its checkpoint was dropped


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    # Supervised steps draw no randomness outside the (per-image seeded) augmentation: 2 x 8 == 1 x 16.
    common = ["--max_steps", "3", "--fewshot_steps", "0", "--eval_steps", "3"]
    full = main(tiny_args(tmp_path / "full", *common, objective="supervised"))
    accum = main(tiny_args(tmp_path / "accum", *common, "--gradient_accumulation_steps", "2", objective="supervised"))
    assert math.isclose(full["param_checksums"][0], accum["param_checksums"][0], rel_tol=1e-6)
    assert full["param_checksums"] != main(tiny_args(tmp_path / "other", *common, "--seed", "1", objective="supervised"))["param_checksums"]


@pytest.mark.parametrize(
    "switch, model",
    [(["--fused_optimizer", "true"], []), (["--fused_optimizer", "true", "--optimizer", "sgd"], ["--optimizer", "sgd"]),
     (["--channels_last", "true"], ["--model", "resnetv2_50x1_bit", "--model_kwargs", "{}", "--batch_size", "8",
                                    "--optimizer", "sgd", "--lr", "0.01"])],
    ids=["fused_adamw", "fused_sgd", "channels_last_bit"],
)  # fmt: skip
def test_speed_switches_train_the_same_weights(tmp_path, switch, model):
    # Same arithmetic, other kernels or memory layout: the weights after 3 steps agree to float rounding (BiT
    # with SGD: AdamW's normalised steps would blow the rounding differences of convolution kernels up).
    common = [*model, "--max_steps", "3", "--fewshot_steps", "0", "--eval_steps", "3"]
    plain = main(tiny_args(tmp_path / "plain", *common, objective="supervised"))
    switched = main(tiny_args(tmp_path / "switched", *common, *switch, objective="supervised"))
    assert math.isclose(plain["param_checksums"][0], switched["param_checksums"][0], rel_tol=1e-5)
