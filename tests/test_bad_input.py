"""Bad input and hostile cases: each gets a clear error before any work where possible, and never costs a checkpoint."""

import errno
import io
import json
import signal
import subprocess
import time

import datasets
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ssvit.config import parse
from ssvit.errors import NonFiniteLossError, UsageError
from ssvit.models import read_state_dict
from ssvit.pretrain import main
from ssvit.train import build_objective

from conftest import PYTHON, ROOT, subprocess_env, tiny_args


def steps_logged(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in line]


def image_folder(root, classes: dict[str, int], size: int = 20):
    """Solid-colour PNGs: classes maps a folder name ('' for images directly in root) to a count."""
    for i, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(count):
            Image.new("RGB", (size, size), (40 * i % 255, 7 * j % 255, 90)).save(root / name / f"{name or 'img'}_{j}.png")
    return root


# ---- loses data or lies -------------------------------------------------------------------------------------


def test_non_finite_weights_are_never_checkpointed_and_the_last_good_one_gives_a_finite_loss(tmp_path):
    # The command: the weights go bad in an optimizer step before any loss shows it.
    args = ["--objective", "supervised", "--lr", "1e6", "--mixed_precision", "no", "--max_grad_norm", "null",
            "--data", "synthetic:400", "--batch_size", "8", "--max_steps", "20", "--save_steps", "1", "--logging_steps", "1",
            "--output_dir", str(tmp_path / "run"), "--report_to", "[]", "--cpu_threads", "1"]  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"last good checkpoint is (\S+) ") as err:
        main(args)
    named = err.value.args[0].split("last good checkpoint is ")[1].split(" ")[0]
    state = load_file(f"{named}/model.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values())
    optimizer = torch.load(f"{named}/optimizer.bin", weights_only=True)
    assert all(torch.isfinite(v).all() for s in optimizer["state"].values() for v in s.values() if torch.is_tensor(v))
    model = build_objective(parse(["--config", f"{named}/config.yaml"]), num_classes=10)
    model.load_state_dict(read_state_dict(named))
    torch.manual_seed(0)
    assert torch.isfinite(model(torch.rand(8, 3, 32, 32), torch.arange(8)).loss)
    assert not list((tmp_path / "run/checkpoints").glob("*.tmp"))


def test_a_second_run_into_the_same_folder_is_refused_and_a_dead_runs_lock_taken_over(tmp_path, capsys):
    args = tiny_args(tmp_path, "--max_steps", "100000", "--save_steps", "1000000")
    proc = subprocess.Popen([PYTHON, "-m", "ssvit.pretrain", *args], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    lock = tmp_path / "run/run.lock"
    deadline = time.time() + 120
    while not (tmp_path / "run/config.yaml").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    try:
        assert json.loads(lock.read_text())["pid"] == proc.pid
        config = (tmp_path / "run/config.yaml").read_bytes()
        with pytest.raises(UsageError, match=rf"in use by another run \(pid {proc.pid} on "):
            main(tiny_args(tmp_path, "--max_steps", "2", "--masked_patch.mask_ratio", "0.25"))
        assert (tmp_path / "run/config.yaml").read_bytes() == config  # the refused run changed nothing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lock.exists()  # a SIGKILL leaves the lock behind; the next run takes it over
    result = main(tiny_args(tmp_path, "--max_steps", "2", "--overwrite_output_dir"))  # (its files are the dead run's)
    assert result["steps"] == 2 and "is no longer running" in capsys.readouterr().out
    assert not lock.exists()


def test_a_refused_resume_changes_nothing_in_the_run_folder(tmp_path):
    main(tiny_args(tmp_path, "--max_steps", "2"))
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="model_kwargs .*embed_dim': 32.* -> .*embed_dim': 48.*not continue exactly"):
        main(tiny_args(tmp_path, "--resume", "--model_kwargs", "{patch_size: 4, embed_dim: 48, depth: 2, num_heads: 2}"))
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_a_streamed_run_resumed_with_other_loader_workers_is_refused(tmp_path, shards):
    """A streamed epoch's order is planned for its processes and loader workers: another count would silently
    train on other images than the interrupted run had left. Refused, naming both, with nothing changed."""
    streamed = ["--data", f"parquet:{shards}", "--streaming", "--max_steps", "4", "--save_steps", "2"]
    main(tiny_args(tmp_path, *streamed, "--dataloader_num_workers", "2"))
    __import__("shutil").rmtree(tmp_path / "run/checkpoints/step_000004")  # as if killed after step 2's checkpoint
    (tmp_path / "run/results.json").unlink()
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(UsageError, match=r"2 DataLoader worker\(s\).*this run reads --streaming over 1 process\(es\) x 1 DataLoader"):
        main(tiny_args(tmp_path, *streamed, "--dataloader_num_workers", "1", "--resume"))
    with pytest.raises(UsageError, match=r"streaming True -> False"):
        main(tiny_args(tmp_path, "--data", f"parquet:{shards}", "--max_steps", "4", "--save_steps", "2", "--resume"))
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    main(tiny_args(tmp_path, *streamed, "--dataloader_num_workers", "2", "--resume"))  # the same plan


def test_metrics_after_a_resume_hold_every_step_once(tmp_path):
    main(tiny_args(tmp_path, "--max_steps", "10", "--save_steps", "5", "--save_total_limit", "5"))
    __import__("shutil").rmtree(tmp_path / "run/checkpoints/step_000010")  # as if killed after step 10 was logged
    main(tiny_args(tmp_path, "--max_steps", "10", "--resume"))
    assert steps_logged(tmp_path / "run") == list(range(1, 11))


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from accelerate import Accelerator

    real = Accelerator.save_state

    def save_state(self, output_dir, **kwargs):
        if "step_000002" not in output_dir:
            return real(self, output_dir, **kwargs)
        (tmp_path / "run/checkpoints/step_000002.tmp").mkdir()
        (tmp_path / "run/checkpoints/step_000002.tmp/model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    with pytest.raises(UsageError, match=r"disk is full.*step_000002.tmp was removed.*step_000001 is kept"):
        main(tiny_args(tmp_path, "--max_steps", "3", "--save_steps", "1"))
    assert [p.name for p in (tmp_path / "run/checkpoints").iterdir()] == ["step_000001"]
    read_state_dict(tmp_path / "run/checkpoints/step_000001")  # intact


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_real_full_disk_is_reported_as_such(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        args = tiny_args(tmp_path, "--max_steps", "40", "--save_steps", "1", "--save_total_limit", "100",
                         "--output_dir", str(disk / "run"))  # fmt: skip
        with pytest.raises(UsageError, match="disk is full"):
            main(args)
        kept = sorted((disk / "run/checkpoints").glob("step_*"))
        assert kept and not [p for p in kept if p.name.endswith(".tmp")]
        read_state_dict(kept[-1])
    finally:
        subprocess.run(["umount", "-l", str(disk)])  # lazy: an open handle of the failed write must not keep it mounted


def test_bf16_on_a_cpu_without_bf16_units_trains_in_fp32_and_says_so(tmp_path, monkeypatch, capsys):
    import ssvit.train

    monkeypatch.setattr(ssvit.train, "cpu_has_bf16", lambda: False)
    result = main(tiny_args(tmp_path, "--max_steps", "1", "--mixed_precision", "bf16"))
    assert result["mixed_precision"] == "no" and "no bf16 matrix units" in capsys.readouterr().out


# ---- the self-supervised case -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["images_in_dir", "one_class", "parquet_image_only"])
def test_masked_patch_trains_on_unlabeled_images_and_supervised_refuses(tmp_path, layout, capsys):
    if layout == "parquet_image_only":
        buf = lambda i: io.BytesIO()  # noqa: E731
        rows = []
        for i in range(40):
            b = buf(i)
            Image.new("RGB", (20, 20), (6 * i, 90, 200)).save(b, format="PNG")
            rows.append({"bytes": b.getvalue(), "path": None})
        datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image()})).to_parquet(
            str(tmp_path / "train.parquet"))  # fmt: skip
        data = f"parquet:{tmp_path / 'train.parquet'}"
    else:
        data = f"imagefolder:{image_folder(tmp_path / 'images', {'' if layout == 'images_in_dir' else 'cats': 40})}"
    result = main(tiny_args(tmp_path, "--data", data, "--batch_size", "8", "--max_steps", "2", "--eval_steps", "2"))
    assert result["steps"] == 2 and "val/color_accuracy" in result and "val/fewshot_5shot" not in result
    assert "no labels" in result["data"] and "Few-shot evaluation skipped" in capsys.readouterr().out
    with pytest.raises(UsageError, match="supervised needs labels"):
        main(tiny_args(tmp_path / "s", "--data", data, "--batch_size", "8", objective="supervised"))


def test_a_small_two_class_folder_holds_out_one_image_per_class(tmp_path):
    data = f"imagefolder:{image_folder(tmp_path / 'images', {'a': 12, 'b': 12})}"
    result = main(tiny_args(tmp_path, "--data", data, "--batch_size", "4", "--max_steps", "1", objective="supervised"))
    assert "22 train / 2 val" in result["data"] and "one per class" in result["data"]


def test_a_file_named_like_a_split_does_not_make_a_split(tmp_path):
    # ImageNet has n02917067_bullet_train.JPEG: datasets' own inference would make it the whole train split.
    root = image_folder(tmp_path / "images", {"a": 10, "b": 10})
    (root / "a/a_0.png").rename(root / "a/bullet_train.png")
    splits = __import__("ssvit.data", fromlist=["load_splits"]).load_splits(
        parse(["--data", f"imagefolder:{root}", "--img_size", "16", "--val_fraction", "0.2"]).train)
    assert len(splits.train) + len(splits.val) == 20 and splits.num_classes == 2


def test_parquet_folder_in_the_hub_layout_with_train_validation_and_test(tmp_path):
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    for split, n in (("train", 30), ("validation", 6), ("test", 8)):
        rows = {"img": [{"bytes": _png(i), "path": None} for i in range(n)], "label": [i % 2 for i in range(n)]}
        for shard in range(2):
            datasets.Dataset.from_dict(rows, features=features).shard(2, shard).to_parquet(
                str(tmp_path / f"data/{split}-0000{shard}-of-00002.parquet"))  # fmt: skip
    result = main(tiny_args(tmp_path, "--data", f"parquet:{tmp_path / 'data'}", "--batch_size", "6", "--max_steps", "1",
                            objective="supervised"))  # fmt: skip
    assert "30 train / 6 val (its validation split; test: its test split)" in result["data"]
    assert "test/top1" in result


def test_a_folder_of_parquet_files_not_named_by_split_is_the_training_set(tmp_path):
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    rows = {"img": [{"bytes": _png(i), "path": None} for i in range(24)], "label": [i % 2 for i in range(24)]}
    for part in range(2):
        datasets.Dataset.from_dict(rows, features=features).shard(2, part).to_parquet(str(tmp_path / f"data/part{part}.parquet"))
    splits = __import__("ssvit.data", fromlist=["load_splits"]).load_splits(
        parse(["--data", f"parquet:{tmp_path / 'data'}", "--img_size", "16", "--val_fraction", "0.25"]).train)
    assert len(splits.train) + len(splits.val) == 24


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (20 * i % 255, 0, 255 - i)).save(buf, format="PNG")
    return buf.getvalue()


# ---- the commands users type --------------------------------------------------------------------------------


def test_any_timm_model_builds_with_model_alone_and_a_foreign_option_is_named(tmp_path):
    run = parse(["--objective", "supervised", "--model", "resnetv2_50x1_bit"])
    assert run.train.model_kwargs == {}  # the quick start's ViT-Ti/4 kwargs belong to its model only
    assert parse([]).train.model_kwargs == {"patch_size": 4, "depth": 6}
    result = main(tiny_args(tmp_path, "--model", "resnetv2_50x1_bit", "--model_kwargs", "null", "--batch_size", "8",
                            "--max_steps", "1", objective="supervised"))  # fmt: skip
    assert result["steps"] == 1
    with pytest.raises(UsageError, match=r"resnetv2_50x1_bit does not take 'patch_size'"):
        main(tiny_args(tmp_path / "b", "--model", "resnetv2_50x1_bit", "--model_kwargs", "{patch_size: 4}", objective="supervised"))


NOWHERE = ["--data", "parquet:/nonexistent/data.parquet"]  # loading it would fail: the errors below come first


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch_size", "0"], "--batch_size 0: must be a positive"),
        (["--save_steps", "0"], "--save_steps 0: must be a positive"),
        (["--logging_steps", "0"], "--logging_steps 0: must be a positive"),
        (["--lr", "-1"], r"--lr -1.0: must be positive \(the peak learning rate\)"),
        (["--masked_patch.mask_ratio", "0.001"], r"must be high enough to corrupt a patch: round\(0.001 x 16\) = 0 of the 16 patches"),
        (["--masked_patch.mask_ratio", "1.5"], r"mask_ratio 1.5: must be in \(0, 1\], the share of patches corrupted"),
        (["--init", "/nonexistent/ckpt"], "--init /nonexistent/ckpt: no such file or folder"),
        (["--val_fraction", "1.5"], "--val_fraction 1.5: must be a fraction"),
        (["--resume", "/nonexistent/step_000100"], "--resume /nonexistent/step_000100: no such checkpoint folder"),
        ([], "--data parquet:/nonexistent/data.parquet: /nonexistent/data.parquet does not exist"),
    ],
    ids=["batch_size", "save_steps", "logging_steps", "lr", "mask_ratio_zero_patches", "mask_ratio_above_1", "init_missing",
         "val_fraction", "resume_missing", "data_missing"],
)  # fmt: skip
def test_bad_flags_fail_at_start_up_naming_the_problem(tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        main(tiny_args(tmp_path, *NOWHERE, *flags))
    assert not (tmp_path / "run").exists()


def test_init_of_a_file_that_is_not_safetensors(tmp_path):
    fake = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, fake)  # a pickle under the right name
    with pytest.raises(UsageError, match="is not a safetensors file.*never unpickles"):
        main(tiny_args(tmp_path, *NOWHERE, "--init", str(fake)))


def test_abbreviated_flags_are_not_taken_for_others(tmp_path):
    with pytest.raises(UsageError, match="max_step"):
        parse(["--max_step", "10"])


def test_a_hub_name_without_network_says_so(tmp_path):
    with pytest.raises(ConnectionError, match="hub cannot be reached.*parquet:DIR"):
        main(tiny_args(tmp_path, "--data", "cifar10"))


def test_an_output_folder_that_cannot_be_written(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UsageError, match="cannot be written"):
        main(tiny_args(tmp_path, "--output_dir", str(tmp_path / "a_file/run")))


def test_the_command_prints_one_line_not_a_traceback(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "ssvit.pretrain", "--lr", "-1"], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "ssvit-pretrain: error: --lr -1.0: must be positive (the peak learning rate)."


@pytest.mark.parametrize("engine", ["FSDP", "DEEPSPEED"])
def test_sharded_training_on_cpu_is_refused_rather_than_silently_replicated(tmp_path, monkeypatch, engine):
    """Accelerate sets up FSDP/DeepSpeed for GPUs only; on CPU it would quietly run DDP (checked with accelerate
    1.15: distributed type MULTI_CPU under `accelerate launch --use_fsdp`)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU machine runs FSDP for real")
    monkeypatch.setenv(f"ACCELERATE_USE_{engine}", "true")
    with pytest.raises(UsageError, match=f"--use_{engine.lower()} needs GPUs"):
        main(tiny_args(tmp_path))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", ["empty", "no_images"])
def test_an_image_folder_without_images_is_one_line_at_start_up(tmp_path, content):
    folder = tmp_path / "images"
    (folder / "cats").mkdir(parents=True)
    if content == "no_images":
        (folder / "cats" / "notes.txt").write_text("not an image")
    with pytest.raises(UsageError, match=f"--data imagefolder:{folder}: no image files in it"):
        main(tiny_args(tmp_path, "--data", f"imagefolder:{folder}"))
    assert not (tmp_path / "run").exists()


def test_every_option_out_of_range_is_named_at_once_by_the_one_range_check(tmp_path):
    """TrainConfig's options and an objective's go through the same check (ssvit.errors.check_ranges): every problem
    of a kind is named in one go, a line each, in one phrasing."""
    with pytest.raises(UsageError) as e:
        main(tiny_args(tmp_path, "--masked_patch.bits", "0", "--masked_patch.grid", "0", "--masked_patch.random_patch_prob", "0.5"))
    assert str(e.value).splitlines() == [
        "--masked_patch.random_patch_prob 0.5: must be 0 or more, and at most 1 with --masked_patch.mask_token_prob 0.8 (paper: 0.1 and 0.8).",
        "--masked_patch.bits 0: must be 1 to 8 bits per channel (paper: 3, i.e. 512 colour classes).",
        "--masked_patch.grid 0: must be 1 or more cells per side (paper: 4).",
    ]
    with pytest.raises(UsageError) as e:
        main(tiny_args(tmp_path, "--batch_size", "0", "--momentum", "1.5"))
    assert str(e.value).splitlines() == ["--batch_size 0: must be a positive whole number.", "--momentum 1.5: must be in [0, 1)."]


def test_init_checkpoint_key_on_an_exported_backbone_names_the_flag_and_the_fix(tmp_path):
    """An exported folder holds one backbone, under no name: the flag is refused with what to do, not an empty list."""
    from ssvit.export import main as export_main

    pre = main(tiny_args(tmp_path / "pre", "--max_steps", "1", "--fewshot_steps", "0"))["checkpoint"]
    export_main([pre, "--out", str(tmp_path / "exported")])
    with pytest.raises(UsageError, match=r"--init_checkpoint_key teacher_backbone: .* holds one backbone .*: drop --init_checkpoint_key"):
        main(tiny_args(tmp_path / "ft", "--init", str(tmp_path / "exported"), "--init_checkpoint_key", "teacher_backbone", objective="supervised"))


def test_a_batch_larger_than_the_labelled_subset_names_the_subset_and_the_fix(tmp_path):
    """1% of 600 synthetic images is one per class: the message said 'the training set (10 images)' of a run whose
    training set the user knows holds 588, with no way out named."""
    with pytest.raises(UsageError, match=r"^--batch_size 16 is larger than the labelled training set: 10 images at "
                                         r"--label_fraction 0.01\. Lower --batch_size to 10 or less, or raise --label_fraction\.$"):  # fmt: skip
        main(tiny_args(tmp_path, "--label_fraction", "0.01", objective="supervised"))
    with pytest.raises(UsageError, match=r"^--batch_size 16 is larger than the training set \(15 images\)\. Lower --batch_size"):
        main(tiny_args(tmp_path / "b", "--data", "synthetic:16"))
