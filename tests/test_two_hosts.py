"""Multi-node training over a real network: two hosts (network namespaces, tests/two_hosts.py) each run
`accelerate launch --num_machines 2 --machine_rank r --main_process_ip <host 0>`, gloo over TCP between them."""

import json
import time

import pytest

from conftest import subprocess_env, tiny_args
from two_hosts import two_hosts, why_not

pytestmark = pytest.mark.skipif(why_not() is not None, reason=f"two network hosts cannot be made here: {why_not()}")


def run_two_hosts(hosts, args, tmp_path, name, timeout=300) -> list[int]:
    procs = [hosts.launch(rank, ["ssvit/pretrain.py", *args], subprocess_env(), log=tmp_path / f"{name}{rank}.log") for rank in (0, 1)]
    deadline = time.time() + timeout
    try:
        return [p.wait(timeout=max(deadline - time.time(), 1)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def log_tail(tmp_path, name) -> str:
    return "\n".join(f"--- host {r} ---\n" + (tmp_path / f"{name}{r}.log").read_text()[-2500:] for r in (0, 1))


def losses(run) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in lines if "train/loss" in r}


def test_two_hosts_train_together_resume_exactly_and_fail_fast_when_one_dies(tmp_path, shards):
    steps = 60  # killed after the step-20 checkpoint, then 40 steps that must replay the uninterrupted run
    common = ["--max_steps", str(steps), "--save_steps", "20", "--eval_steps", str(steps), "--fewshot_steps", "0"]
    with two_hosts() as hosts:
        # Uninterrupted: both hosts end with the same weights, each process trained on its half of every batch.
        straight = tiny_args(tmp_path / "straight", *common)
        assert run_two_hosts(hosts, straight, tmp_path, "straight") == [0, 0], log_tail(tmp_path, "straight")
        result = json.loads((tmp_path / "straight/run/results.json").read_text())
        assert result["num_processes"] == 2 and result["steps"] == steps
        a, b = result["param_checksums"]
        assert a == b
        assert result["images_per_process"] == [steps * 16 // 2] * 2  # --batch_size 16 is global: 8 per process

        # Streamed for one epoch (13 steps: 235 images, 2 processes of 1 worker, 8 images each per step): each host
        # read its own row groups of the shards, none read by both.
        stream = tiny_args(tmp_path / "stream", "--data", f"parquet:{shards}", "--streaming", "--dataloader_num_workers", "1",
                           "--max_steps", "13", "--eval_steps", "13", "--fewshot_steps", "0")  # fmt: skip
        assert run_two_hosts(hosts, stream, tmp_path, "stream") == [0, 0], log_tail(tmp_path, "stream")
        streamed = json.loads((tmp_path / "stream/run/results.json").read_text())
        groups = [set(g) for g in streamed["streamed_row_groups"]]
        assert all(groups) and not groups[0] & groups[1] and len(groups[0] | groups[1]) >= 24 - 3
        assert streamed["param_checksums"][0] == streamed["param_checksums"][1]

        # Both hosts killed after the step-20 checkpoint, then resumed on both: the losses of the uninterrupted run.
        args = tiny_args(tmp_path / "resumed", *common)
        procs = [hosts.launch(rank, ["ssvit/pretrain.py", *args], subprocess_env(), log=tmp_path / f"first{rank}.log") for rank in (0, 1)]
        first = tmp_path / "resumed/run/checkpoints/step_000020"
        deadline = time.time() + 240
        while not first.exists() and procs[0].poll() is None and time.time() < deadline:
            time.sleep(0.005)
        hosts.kill(0), hosts.kill(1)
        assert [p.wait(timeout=60) for p in procs] == [-9, -9], "the run finished before it could be killed"
        assert run_two_hosts(hosts, [*args, "--resume"], tmp_path, "resume") == [0, 0], log_tail(tmp_path, "resume")
        reference, resumed = losses(tmp_path / "straight/run"), losses(tmp_path / "resumed/run")
        assert resumed == reference  # every step once, each the same loss: exact in fp32 on CPU
        assert json.loads((tmp_path / "resumed/run/results.json").read_text())["param_checksums"] == result["param_checksums"]

        # A host dies (SIGKILL to all its processes) mid-run: the other fails within a bounded time, saying so.
        long = tiny_args(tmp_path / "killed", "--max_steps", "100000", "--save_steps", "100000", "--eval_steps", "100000")
        procs = [hosts.launch(rank, ["ssvit/pretrain.py", *long], subprocess_env(), log=tmp_path / f"killed{rank}.log") for rank in (0, 1)]
        deadline = time.time() + 240
        while time.time() < deadline and "train/loss" not in _read(tmp_path / "killed/run/metrics.jsonl"):
            assert procs[0].poll() is None and procs[1].poll() is None, log_tail(tmp_path, "killed")
            time.sleep(0.2)
        hosts.kill(1)
        killed = time.time()
        code = procs[0].wait(timeout=120)  # bounded: a hang fails the test here
        took = time.time() - killed
        print(f"host 0 stopped {took:.1f} s after host 1 was killed")  # pytest -s shows it
        assert code != 0
        assert took < 120
        log = (tmp_path / "killed0.log").read_text()
        assert "ssvit-pretrain: error: another process of this run stopped" in log, log[-3000:]
        assert "--resume" in log


def _read(path) -> str:
    return path.read_text() if path.exists() else ""
