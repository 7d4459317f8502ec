"""What a run guarantees off its tested path (docs/reliability.md): it never loses a file it did not write, it
stops cleanly on a signal, and a resume is exact or refused by name."""

import io
import os
import shutil
import signal
import subprocess
import time

import datasets
import numpy as np
import psutil
import pytest
from PIL import Image

from ssvit.config import parse
from ssvit.errors import Interrupted, UsageError
from ssvit.export import main as export_main
from ssvit.pretrain import main

from conftest import PYTHON, ROOT, losses, subprocess_env, tiny_args


def files_of(folder) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---- run folders: a run never deletes or overwrites what another run wrote ------------------------------------


def test_a_fresh_run_into_a_folder_holding_another_run_is_refused_and_changes_nothing(tmp_path, capsys):
    main(tiny_args(tmp_path, "--max_steps", "6", "--save_steps", "3"))
    before = files_of(tmp_path / "run")
    # The case: another seed, fewer steps, no --resume. It used to delete its own checkpoints by rotation.
    with pytest.raises(UsageError, match=r"holds another run \(.*step_000006.*--resume.*--overwrite_output_dir"):
        main(tiny_args(tmp_path, "--max_steps", "3", "--seed", "1"))
    assert files_of(tmp_path / "run") == before
    # Asked for: the old run's files are replaced, and every path the summary names exists.
    result = main(tiny_args(tmp_path, "--max_steps", "3", "--seed", "1", "--overwrite_output_dir"))
    assert "replacing the run" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "run/checkpoints").iterdir()] == ["step_000003"]
    assert os.path.isdir(result["checkpoint"]) and os.path.isdir(result["best"]["path"])
    assert max(losses(tmp_path / "run")) == 3


def test_resuming_from_an_earlier_checkpoint_with_later_ones_beside_it_is_refused(tmp_path):
    main(tiny_args(tmp_path, "--max_steps", "6", "--save_steps", "3"))
    before = files_of(tmp_path / "run")
    with pytest.raises(UsageError, match=r"later checkpoints.*step_000006.*would replace them"):
        main(tiny_args(tmp_path, "--max_steps", "6", "--resume", str(tmp_path / "run/checkpoints/step_000003")))
    assert files_of(tmp_path / "run") == before
    # Into a folder of its own, the earlier checkpoint continues as a new branch of the run.
    branch = tiny_args(tmp_path / "branch", "--max_steps", "6", "--resume", str(tmp_path / "run/checkpoints/step_000003"))
    assert main(branch)["steps"] == 6 and files_of(tmp_path / "run") == before


def test_resuming_a_finished_run_keeps_its_results(tmp_path, capsys):
    first = main(tiny_args(tmp_path, "--max_steps", "2", "--eval_steps", "2"))
    saved = (tmp_path / "run/results.json").read_bytes()
    again = main(tiny_args(tmp_path, "--max_steps", "2", "--eval_steps", "2", "--resume"))
    assert "already finished at step 2" in capsys.readouterr().out
    assert (tmp_path / "run/results.json").read_bytes() == saved
    assert again["val/color_accuracy"] == first["val/color_accuracy"]


# ---- resume is exact, or refused by name ------------------------------------------------------------------------


def test_a_resume_with_other_training_settings_is_refused_unless_allowed_and_then_recorded(tmp_path, capsys):
    main(tiny_args(tmp_path, "--max_steps", "4", "--save_steps", "2"))
    ckpt = tmp_path / "run/checkpoints/step_000002"
    shutil.rmtree(tmp_path / "run/checkpoints/step_000004")
    (tmp_path / "run/results.json").unlink()
    before = files_of(tmp_path / "run")
    with pytest.raises(UsageError, match=r"batch_size 16 -> 8.*not continue exactly.*--allow_inexact_resume"):
        main(tiny_args(tmp_path, "--max_steps", "4", "--batch_size", "8", "--resume"))
    with pytest.raises(UsageError, match=r"data 'synthetic:600' -> 'synthetic:700'"):
        main(tiny_args(tmp_path, "--max_steps", "4", "--data", "synthetic:700", "--resume"))
    # A checkpoint that lost its RNG states would resume with other corruption and crops.
    os.rename(ckpt / "random_states_0.pkl", tmp_path / "rng.pkl")
    with pytest.raises(UsageError, match=r"random_states_0.pkl.*missing"):
        main(tiny_args(tmp_path, "--max_steps", "4", "--resume"))
    os.rename(tmp_path / "rng.pkl", ckpt / "random_states_0.pkl")
    assert files_of(tmp_path / "run") == before
    result = main(tiny_args(tmp_path, "--max_steps", "4", "--batch_size", "8", "--resume", "--allow_inexact_resume"))
    assert result["steps"] == 4 and "no longer exact" in capsys.readouterr().out
    assert "allow_inexact_resume: true" in (tmp_path / "run/config.yaml").read_text()


def test_a_run_saved_before_a_key_was_renamed_resumes_exactly(tmp_path):
    """A checkpoint whose config.yaml has init_student (before --init_checkpoint_key) is the same run, not a change."""
    main(tiny_args(tmp_path, "--max_steps", "4", "--save_steps", "2"))
    shutil.rmtree(tmp_path / "run/checkpoints/step_000004")
    (tmp_path / "run/results.json").unlink()
    for config in (tmp_path / "run/config.yaml", tmp_path / "run/checkpoints/step_000002/config.yaml"):
        old = config.read_text().replace("init_checkpoint_key: null", "init_student: false      ")  # the manifest's size
        assert "init_student" in old
        config.write_text(old)
    assert main(tiny_args(tmp_path, "--max_steps", "4", "--resume"))["steps"] == 4


def test_a_damaged_checkpoint_is_named_with_the_newest_intact_one(tmp_path):
    main(tiny_args(tmp_path, "--max_steps", "4", "--save_steps", "2"))
    (tmp_path / "run/results.json").unlink()
    newest = tmp_path / "run/checkpoints/step_000004"
    for name in ("model.safetensors", "optimizer.bin"):
        original = (newest / name).read_bytes()
        (newest / name).write_bytes(original[: len(original) // 2])
        with pytest.raises(UsageError, match=rf"step_000004/{name} is damaged.*newest intact checkpoint is .*step_000002"):
            main(tiny_args(tmp_path, "--max_steps", "6", "--resume"))
        (newest / name).write_bytes(original)
    # A damaged file as --init says so too, not "not a safetensors file".
    half = tmp_path / "half.safetensors"
    half.write_bytes((newest / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(UsageError, match="damaged"):
        main(tiny_args(tmp_path / "init", "--init", str(half)))


# ---- preemption -------------------------------------------------------------------------------------------------


def start(args) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "ssvit.pretrain", *args], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for_step(run_dir, step: int, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir) or [0]) >= step:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run did not reach step {step}: {proc.poll()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_the_current_step_and_resume_gives_the_same_losses(tmp_path, sig):
    common = ["--max_steps", "60", "--save_steps", "1000", "--dataloader_num_workers", "1"]
    main(tiny_args(tmp_path / "straight", *common))
    reference = losses(tmp_path / "straight/run")

    args = tiny_args(tmp_path / "stopped", *common)
    run_dir = tmp_path / "stopped/run"
    proc = start(args)
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    stopped_at = max(losses(run_dir))
    assert stopped_at < 60
    ckpt = run_dir / f"checkpoints/step_{stopped_at:06d}"
    assert lines[-1].startswith(f"ssvit-pretrain: stopped by {sig.name} at step {stopped_at}: checkpoint {ckpt}")
    assert "--resume" in lines[-1] and ckpt.is_dir() and not (run_dir / "run.lock").exists()

    result = main([*args, "--resume"])
    assert result["steps"] == 60
    assert losses(run_dir) == reference  # exact in fp32 on CPU, every step logged once


def test_a_second_signal_stops_at_once(tmp_path):
    """The first signal is taken (the handler says so), the second ends the process by the signal itself: killed by
    SIGTERM, not the graceful exit code 143 that the first signal's path ends with."""
    code = ("import os, signal, time\n"
            "from ssvit.train import StopSignals\n"
            "with StopSignals() as stop:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    print('first taken:', stop.received, flush=True)\n"
            "    time.sleep(60)\n")  # fmt: skip
    proc = subprocess.Popen([PYTHON, "-c", code], cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == f"first taken: {int(signal.SIGTERM)}"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM


def signal_after_step(n: int, monkeypatch) -> None:
    """SIGTERM this process right after its n-th training step (the loop's own train_step, wrapped)."""
    import ssvit.train

    real, calls = ssvit.train.train_step, []

    def step_then_signal(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(ssvit.train, "train_step", step_then_signal)


def test_a_signal_in_process_raises_interrupted_with_the_resume_line(tmp_path, monkeypatch):
    signal_after_step(2, monkeypatch)
    with pytest.raises(Interrupted, match=r"stopped by SIGTERM at step 2: checkpoint .*step_000002. Resume with: "):
        main(tiny_args(tmp_path, "--max_steps", "50"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the run's only


@pytest.mark.parametrize("argv0", ["/usr/bin/ssvit", "ssvit/pretrain.py", "-c"])
def test_the_resume_line_comes_from_the_run_not_from_how_python_was_started(tmp_path, monkeypatch, argv0):
    """The command that continues a run is the run's own (ssvit-pretrain, by the name parse was given), whatever
    sys.argv holds: it was read from sys.argv, so a run started from Python (`-c`, a notebook, a study) or by `ssvit
    pretrain` could be told another command or none."""
    import sys

    signal_after_step(1, monkeypatch)
    monkeypatch.setattr(sys, "argv", [argv0, "--unrelated"])
    with pytest.raises(Interrupted) as e:
        main(tiny_args(tmp_path, "--max_steps", "50"))
    assert str(e.value).endswith(f"Resume with: ssvit pretrain --config {tmp_path / 'run' / 'config.yaml'} --resume")


def test_a_signal_before_the_first_step_leaves_the_folder_for_the_same_command(tmp_path, monkeypatch):
    import ssvit.train

    real = ssvit.train.setup

    def setup_then_signal(*a, **k):  # e.g. Ctrl-C while a large data set is decoded into the cache
        state = real(*a, **k)
        os.kill(os.getpid(), signal.SIGINT)
        return state

    monkeypatch.setattr(ssvit.train, "setup", setup_then_signal)
    with pytest.raises(Interrupted, match="stopped by SIGINT before the first step: nothing was trained"):
        main(tiny_args(tmp_path, "--max_steps", "2"))
    monkeypatch.setattr(ssvit.train, "setup", real)
    assert main(tiny_args(tmp_path, "--max_steps", "2"))["steps"] == 2  # not refused as "holds another run"


# ---- numbers out of range ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--samples_per_class", "-3"], "--samples_per_class -3"),
        (["--masked_patch.bits", "0"], "--masked_patch.bits 0"),
        (["--masked_patch.grid", "0"], "--masked_patch.grid 0"),
        (["--masked_patch.mosaic_images", "-1"], "--masked_patch.mosaic_images -1"),
        (["--supervised.label_smoothing", "1.5", "--objective", "supervised"], "--supervised.label_smoothing 1.5"),
        (["--eval_batches", "0"], "--eval_batches 0"),
        (["--fewshot_steps", "-1"], "--fewshot_steps -1"),
        (["--shuffle_buffer", "0"], "--shuffle_buffer 0"),
        (["--dataloader_num_workers", "-1"], "--dataloader_num_workers -1"),
        (["--cpu_threads", "0"], "--cpu_threads 0"),
        (["--crop_scale", "[0.9, 0.2]"], "--crop_scale"),
        (["--ema_decay", "1.5"], "--ema_decay 1.5"),
        (["--layer_decay", "0"], "--layer_decay 0"),
        (["--momentum", "-0.1"], "--momentum -0.1"),
        (["--adam_beta2", "1"], "--adam_beta2 1"),
        (["--lr_base_batch_size", "0"], "--lr_base_batch_size 0"),
        (["--weight_decay", "-1"], "--weight_decay -1"),
        (["--warmup_steps", "-2"], "--warmup_steps -2"),
    ],
)  # fmt: skip
def test_numbers_out_of_range_are_refused_at_start_up(tmp_path, flags, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace(".", r"\.")):
        main(tiny_args(tmp_path, "--data", "parquet:/nonexistent/x.parquet", *flags))
    assert not (tmp_path / "run").exists()


# ---- errors in the way: one line, first ------------------------------------------------------------------------


def test_a_config_file_with_a_yaml_error_or_an_unknown_key_is_named_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nmax_steps: [3\n")
    with pytest.raises(UsageError, match=rf"--config {bad}: not valid YAML at line 2"):
        parse(["--config", str(bad)])
    bad.write_text("lr: 0.1\nmax_stepz: 3\n")
    with pytest.raises(UsageError, match=rf"--config {bad}: unknown key 'max_stepz' \(did you mean max_steps\?\)"):
        parse(["--config", str(bad)])
    proc = subprocess.run([PYTHON, "-m", "ssvit.pretrain", "--config", str(bad)], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    with pytest.raises(UsageError) as unknown_flag:  # one line, naming the flag and --help (the CLI prints it as above)
        parse(["--max_stepz", "3"])
    assert len(str(unknown_flag.value).splitlines()) == 1 and "max_stepz" in str(unknown_flag.value) and "--help" in str(unknown_flag.value)


def test_a_corrupt_row_while_streaming_is_one_line_without_the_worker_traceback(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(png, format="PNG")
    images = [png.getvalue()] * 80
    images[37] = b"not an image"
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"jpeg": pa.array(images, pa.binary())}), tmp_path / "data/train.parquet", row_group_size=10)
    args = tiny_args(tmp_path, "--data", f"parquet:{tmp_path / 'data'}", "--streaming", "--image_column", "jpeg",
                     "--val_fraction", "0.1", "--max_steps", "20", "--dataloader_num_workers", "1")  # fmt: skip
    proc = subprocess.run([PYTHON, "-m", "ssvit.pretrain", *args], cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ssvit-pretrain: error: Could not decode the image at row 7 of row group 3"), proc.stderr
    assert "Traceback" not in proc.stderr


# ---- data: discovery is exact, images decode as they are --------------------------------------------------------


def _shard(path, n: int, colour: int) -> None:
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (colour, 0, 0)).save(png, format="PNG")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {"image": [{"bytes": png.getvalue(), "path": None}] * n, "label": [i % 2 for i in range(n)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))


def test_parquet_discovery_takes_the_hub_layout_only_never_a_recursive_search(tmp_path):
    from ssvit.data import load_splits

    _shard(tmp_path / "shards/train-00000-of-00001.parquet", 40, 10)
    _shard(tmp_path / "shards/backup/train-00000-of-00001.parquet", 40, 20)  # a copy kept aside
    _shard(tmp_path / "shards/old/validation-00000-of-00001.parquet", 10, 30)
    splits = load_splits(parse(["--data", f"parquet:{tmp_path / 'shards'}", "--img_size", "16"]).train)
    assert len(splits.train) + len(splits.val) == 40 and "held out of train" in splits.description
    # The hub's data/ folder.
    _shard(tmp_path / "hub/data/train-00000-of-00001.parquet", 30, 10)
    _shard(tmp_path / "hub/data/validation-00000-of-00001.parquet", 6, 10)
    splits = load_splits(parse(["--data", f"parquet:{tmp_path / 'hub'}", "--img_size", "16"]).train)
    assert (len(splits.train), len(splits.val)) == (30, 6)
    # Streaming finds the same files.
    from ssvit.stream import streaming_splits

    streamed = streaming_splits(parse(["--data", f"parquet:{tmp_path / 'shards'}", "--img_size", "16", "--streaming"]).train, 0, 1, 4)
    assert streamed.train.groups.total == 40 and len(streamed.train.groups.files) == 1
    for spec in ("parquet:", "imagefolder:", "parquet"):
        with pytest.raises(UsageError, match=rf"--data {spec}: .*needs a path"):
            main(tiny_args(tmp_path / "x", "--data", spec))


def test_16_bit_images_decode_to_their_values_not_white(tmp_path):
    from ssvit.data import pil_decode, load_splits
    from ssvit.shards import prepare

    grey = np.full((16, 16), 0x8080, dtype=np.uint16)  # 50% grey in 16 bits: 128 in 8 bits
    folder = tmp_path / "images/a"
    folder.mkdir(parents=True)
    for i in range(10):
        Image.fromarray(grey).save(folder / f"{i}.png")  # mode I;16
    assert Image.open(folder / "0.png").mode in ("I;16", "I")
    assert pil_decode((folder / "0.png").read_bytes()).float().mean().round() == 128
    splits = load_splits(parse(["--data", f"imagefolder:{tmp_path / 'images'}", "--img_size", "16", "--val_fraction", "0.2"]).train)
    assert splits.val.images.float().mean().round() == 128  # the uint8 cache
    prepare(f"imagefolder:{tmp_path / 'images'}", tmp_path / "shards", quiet=True, workers=1)
    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path / "shards"))["train"]
    assert np.asarray(ds[0]["image"].convert("RGB")).mean().round() == 128


def test_prepare_refuses_a_truncated_jpeg_even_when_it_keeps_the_bytes(tmp_path):
    from ssvit.shards import prepare

    folder = tmp_path / "src/a"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=95)
    whole = (folder / "0.jpg").read_bytes()
    (folder / "0.jpg").write_bytes(whole[: len(whole) // 2])
    summary = prepare(f"imagefolder:{tmp_path / 'src'}", tmp_path / "shards", quiet=True, workers=1)
    assert summary["written"] == {"train": 2} and summary["refused"] == 1
    assert "0.jpg" in (tmp_path / "shards/refused.txt").read_text()


def running(process):
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_prepare_killed_with_sigkill_leaves_no_worker_behind(tmp_path):
    folder = tmp_path / "src/a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(300):
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    proc = subprocess.Popen([PYTHON, "-m", "ssvit.prepare", f"imagefolder:{tmp_path / 'src'}", "--out", str(tmp_path / "shards"),
                             "--max_side", "64", "--workers", "2"], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    # psutil, not /proc by hand: a thread or worker that exits between listing and reading must not fail the test
    # (reading /proc/<pid>/task/<tid>/children raced a finishing thread once in CI)
    parent = psutil.Process(proc.pid)
    children = []
    deadline = time.time() + 120
    while len(children) < 2 and proc.poll() is None and time.time() < deadline:
        try:
            children = parent.children()
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    assert len(children) >= 2, "prepare's workers never started"
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not [c for c in alive if running(c)], f"a worker outlived the killed prepare: {alive}"


# ---- export never deletes its input -----------------------------------------------------------------------------


def test_export_onto_its_own_checkpoint_or_run_folder_is_refused_and_deletes_nothing(tmp_path):
    main(tiny_args(tmp_path, "--max_steps", "1", "--fewshot_steps", "0"))
    run = tmp_path / "run"
    ckpt = run / "checkpoints/step_000001"
    before = files_of(run)
    for out in (ckpt, run, run / "checkpoints", ckpt / "exported"):
        with pytest.raises(UsageError, match=r"--out .* (is|holds|lies inside) the checkpoint"):
            export_main([str(ckpt), "--out", str(out), "--overwrite"])
        assert files_of(run) == before, out
    # A replaced export is written before the old one goes: a failed export keeps it.
    export_main([str(ckpt), "--out", str(tmp_path / "exported")])
    with pytest.raises(UsageError):
        export_main([str(tmp_path / "nothing"), "--out", str(tmp_path / "exported"), "--overwrite"])
    assert (tmp_path / "exported/model.safetensors").exists()


def test_a_run_that_fails_before_it_starts_leaves_no_folder_it_made(tmp_path):
    """A refusal after the folder was taken (here: data that is not parquet) removes the folder the run created
    for its lock, so nothing is left that looks like a run; a folder that was there before stays."""
    bad = tmp_path / "not.parquet"
    bad.write_text("not parquet")
    with pytest.raises(Exception):
        main(tiny_args(tmp_path / "fresh", "--data", f"parquet:{bad}"))
    assert not (tmp_path / "fresh/run").exists()
    (tmp_path / "kept/run").mkdir(parents=True)
    with pytest.raises(Exception):
        main(tiny_args(tmp_path / "kept", "--data", f"parquet:{bad}"))
    assert (tmp_path / "kept/run").is_dir() and not any((tmp_path / "kept/run").iterdir())
