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
