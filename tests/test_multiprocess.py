"""Two CPU processes (gloo) through `accelerate launch`: they train together and agree on the weights."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, subprocess_env, tiny_args

# `accelerate launch --cpu --num_processes 2` silently runs one process (accelerate 1.x); --multi_gpu on a
# machine without GPUs starts two gloo processes.
LAUNCH = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip


def free_port() -> int:
    """A port no one listens on now: launches from tests running side by side (pytest -n) must not share one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, timeout=600) -> None:
    command = [*LAUNCH, "--main_process_port", str(free_port()), *args]
    proc = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_processes_train_together_and_agree_on_the_weights(tmp_path):
    launch("ssvit/pretrain.py", *tiny_args(tmp_path, "--max_steps", "3", "--eval_steps", "3"))
    result = json.loads((tmp_path / "run/results.json").read_text())
    assert result["num_processes"] == 2 and result["steps"] == 3
    a, b = result["param_checksums"]
    assert a == b  # gradients were averaged: both processes hold the same weights
    assert "val/color_accuracy" in result  # validation metrics were synced across the two shards


def test_two_processes_draw_different_corruption(tmp_path):
    out = tmp_path / "corruption.json"
    launch(str(ROOT / "tests/two_process_corruption.py"), str(out))
    result = json.loads(out.read_text())
    assert result["num_processes"] == 2 and result["same"] is False


def test_a_study_trains_run_after_run_in_one_process_group(tmp_path):
    """`accelerate launch ssvit/compare.py` on several GPUs: every run ended the process group (end_training), so the
    study's second run failed at its first barrier ("Default process group has not been initialized"). Now the group
    lives as long as the command; the frozen features and the least-squares read-out are measured once (the main
    process first, the others read its record) and the report is written once."""
    import csv

    import yaml

    from conftest import TINY_VIT

    study = {"output_dir": str(tmp_path / "study"), "budgets": [64], "pretrain_shares": [0.5], "seeds": [0],
             "label_fractions": [0.5], "lsq": True, "frozen_max_train": 64,
             "base": {"model": "vit_tiny_patch16_224", "model_kwargs": yaml.safe_load(TINY_VIT[TINY_VIT.index("--model_kwargs") + 1]),
                      "img_size": 16, "data": "synthetic:200", "mixed_precision": "no", "report_to": [], "eval_steps": 1000000},
             "objectives": {"mae": {"mae.decoder_embed_dim": 16, "mae.decoder_num_heads": 2, "mae.decoder_depth": 1}},
             "pretrain": {"batch_size": 8, "warmup_steps": 1}, "finetune": {"batch_size": 8, "warmup_steps": 1}}  # fmt: skip
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    launch("ssvit/compare.py", "--config", str(tmp_path / "study.yaml"))
    root = tmp_path / "study"
    with open(root / "results.csv") as f:
        arms = sorted(r["arm"] for r in csv.DictReader(f) if r["kind"] == "budget")
    assert arms == ["mae0.5", "mae0.5+lsq", "scratch"]  # each cell once, not once per process
    for run in ("finetune_scratch_images64_frac0.5_seed0", "finetune_mae0.5_images96_frac0.5_seed0"):
        result = json.loads((root / "runs" / run / "results.json").read_text())
        assert result["num_processes"] == 2 and len(set(result["param_checksums"])) == 1
    assert json.loads((root / "runs/finetune_mae0.5+lsq_images64_frac0.5_seed0/lsq.json").read_text())["labelled_images"] == 90
