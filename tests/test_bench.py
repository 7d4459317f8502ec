"""The benchmark reports (it asserts nothing about speed): every figure the docs tables (docs/performance.md) need is there."""

import json

import pytest

from ssvit.bench import main


def test_bench_reports_throughput_flops_mfu_and_peers(tmp_path):
    out = tmp_path / "bench.json"
    report = main(["--model_kwargs", "{patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}", "--img_size", "16",
                   "--batch_size", "8", "--windows", "1", "--precision", "fp32", "--fused_optimizer", "true", "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == report
    assert report["fused_optimizer"] is True and report["channels_last"] is False
    fp32 = report["results"]["fp32"]
    assert fp32["peak_flops"] > 0 and fp32["peak_source"] == "measured fp32 matmul"
    ours = fp32["steps"]["ssvit_masked_patch"]
    assert ours["images_per_s"] > 0 and ours["flops_per_image"] > 0 and 0 < ours["mfu"]
    assert set(ours["step_split_s"]) == {"data_wait_s", "forward_s", "backward_s", "optimizer_s"}
    assert "timm_supervised" in fp32["steps"]
    assert {"mfu", "time_vs_timm_supervised", "input_pipeline_vs_step"} <= set(fp32["ratios"])


def test_pipeline_benchmark_reports_every_row_and_the_ratios(tmp_path):
    from conftest import IMAGENET_SAMPLE
    import pytest

    if not IMAGENET_SAMPLE.exists():
        pytest.skip("../shared ImageNet sample not present")
    report = main(["--pipeline", "--data", f"imagefolder:{IMAGENET_SAMPLE}", "--images", "8", "--img_size", "64",
                   "--max_side", "96", "--rounds", "2", "--out", str(tmp_path / "pipeline.json")])  # fmt: skip
    rows = report["images_per_s_per_core"]
    inputs = [f"{kind}, {source}" for source in ("folder", "shards")
              for kind in ("decode only (Pillow)", "decode only (torchvision)", "decode only (simplejpeg)", "timm create_transform", "ssvit")]  # fmt: skip
    assert set(rows) == {*inputs, "ssvit streaming, shards"}
    assert all(v > 0 for v in rows.values()) and report["cores_per_gpu_for_3000_images_per_s"] > 0
    assert all(len(r) == 2 and rows[name] == max(r) for name, r in report["rounds"].items())  # the best of 2 rounds
    assert 0 < report["rows_decoded_by_bands_on_the_shards"] < 1  # prepared shards carry restart markers: bands cut
    assert set(report["collate_ms_per_image"]) == {"torch default_collate", "ssvit collate"}
    assert set(report["ratios"]) == {"ssvit_shards_vs_timm_folder", "ssvit_folder_vs_timm_folder", "ssvit_shards_vs_fastest_decode_only_shards",
                                     "ssvit_shards_vs_pillow_decode_only_shards", "ssvit_streaming_vs_ssvit_shards"}  # fmt: skip


def test_end_to_end_compares_a_real_pretraining_run_with_the_bare_step_for_every_objective(tmp_path, monkeypatch):
    import ssvit.train

    workers, loader_workers = [], ssvit.train.loader_workers
    monkeypatch.setattr(ssvit.train, "loader_workers", lambda cfg, splits: workers.append(cfg.dataloader_num_workers) or loader_workers(cfg, splits))
    report = main(["--model_kwargs", "{patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}", "--img_size", "16",
                   "--batch_size", "16", "--windows", "2", "--logging_steps", "3", "--precision", "fp32",
                   "--objective", "masked_patch", "fixmatch", "--dataloader_num_workers", "0",
                   "--end_to_end", "synthetic:400", "--out", str(tmp_path / "e2e.json")])  # fmt: skip
    assert json.loads((tmp_path / "e2e.json").read_text()) == report
    assert workers == [0, 0] and report["dataloader_num_workers"] == 0  # the runs augment in the training process
    assert set(report["objectives"]) == {"masked_patch", "fixmatch"}
    for row in report["objectives"].values():
        assert row["bare_step_images_per_s"] > 0 and row["pretrain_run_images_per_s"] > 0 and row["windows"] == 2
        assert row["overhead"] == 1 - row["pretrain_run_images_per_s"] / row["bare_step_images_per_s"]
        assert 0 <= row["data_wait_fraction"] < 1


def test_cost_counts_the_flops_of_the_imagenet_presets_and_labels_the_gpu_estimate(tmp_path, monkeypatch, capsys):
    import ssvit.bench

    monkeypatch.setattr(ssvit.bench, "PRESETS", ("vit_b16_mpp_imagenet",))
    report = main(["--cost", "--out", str(tmp_path / "cost.json")])
    row = report["presets"]["vit_b16_mpp_imagenet"]
    assert 95 < row["gflops_per_image"] < 110  # ViT-B/16 at 224: 3 x 17.6 GMACs x 2, plus the head
    assert row["preset_images"] == 200_000 * 4096
    assert row["preset_gpu_hours"] * 3600 * row["images_per_s_per_gpu"] == pytest.approx(row["preset_images"])
    assert "ESTIMATED" in capsys.readouterr().out


def test_lightly_s_mocov3_peer_does_the_same_work_as_ssvit_s():
    """The peer row is only a comparison if both steps count the same FLOPs (encoders, projector, predictor, keys)."""
    pytest.importorskip("lightly")
    from types import SimpleNamespace

    import torch

    from ssvit.bench import count_flops, lightly_mocov3
    from ssvit.config import parse
    from ssvit.train import build_objective, example_batch, inputs

    kwargs = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    args = SimpleNamespace(model="vit_tiny_patch16_224", model_kwargs=kwargs, img_size=16, batch_size=4)
    peer, _ = lightly_mocov3(args, torch.device("cpu"))["lightly_mocov3"]
    run = parse(["--objective", "mocov3", "--model_kwargs", str(kwargs), "--img_size", "16"])
    ours, batch = build_objective(run, 10), example_batch(run, 4)
    images, labels = torch.rand(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)
    flops = count_flops(lambda x, y: ours(*inputs(batch)).loss, images, labels, torch.device("cpu"), "fp32")
    assert count_flops(peer, images, labels, torch.device("cpu"), "fp32") == pytest.approx(flops, rel=0.02)
