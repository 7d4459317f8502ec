"""Export contracts: timm loads the folder with nothing of ssvit, strictly, and gives the same features."""

import subprocess
import sys

import pytest
import torch

from ssvit.errors import UsageError
from ssvit.export import main as export_main
from ssvit.models import build_timm_model
from ssvit.pretrain import main as pretrain_main

from conftest import tiny_args

ARCHS = {
    "vit": [],
    "hybrid": ["--model", "vit_tiny_r_s16_p8_224", "--img_size", "32", "--model_kwargs", "{depth: 1}"],
    "bit": ["--model", "resnetv2_50x1_bit", "--model_kwargs", "{}", "--batch_size", "8"],
}

# Run in a fresh interpreter in which importing ssvit fails: only timm does the loading.
LOAD = """
import sys, torch
sys.modules["ssvit"] = None; sys.modules["objectives"] = None
import timm
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
x = torch.load(sys.argv[2])
torch.save(model(x), sys.argv[3])
"""


@pytest.mark.parametrize("arch", ARCHS)
def test_exported_backbone_loads_in_timm_alone_with_the_same_features(tmp_path, arch):
    pretrain_main(tiny_args(tmp_path, "--max_steps", "1", "--fewshot_steps", "0", *ARCHS[arch], objective="supervised"))
    ckpt = tmp_path / "run/checkpoints/step_000001"
    out = export_main([str(ckpt), "--out", str(tmp_path / "exported")])
    model, args = build_timm_model(ckpt)
    size = args.get("img_size", 16)
    x = torch.rand(2, 3, size, size)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", LOAD, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   cwd=tmp_path, check=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})  # fmt: skip
    with torch.no_grad():
        expected = model(x)
    theirs = torch.load(tmp_path / "y.pt")
    assert theirs.shape == expected.shape
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["vit", "bit"])
def test_onnx_export_runs_in_onnxruntime_with_the_same_outputs(tmp_path, arch):
    ort = pytest.importorskip("onnxruntime", minversion="1.24", reason="onnxruntime >= 1.24 (Python >= 3.11) runs the exported BiT right")
    pretrain_main(tiny_args(tmp_path, "--max_steps", "1", "--fewshot_steps", "0", *ARCHS[arch], objective="supervised"))
    ckpt = tmp_path / "run/checkpoints/step_000001"
    out = export_main([str(ckpt), "--out", str(tmp_path / "exported"), "--onnx"])
    model, args = build_timm_model(ckpt)
    size = args.get("img_size", 16)
    x = torch.rand(3, 3, size, size)  # exported with batch 1: the batch axis is dynamic
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (theirs,) = session.run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    # float32 kernels of two runtimes: equal to 1e-4 relative, 1e-4 absolute.
    torch.testing.assert_close(torch.from_numpy(theirs), expected, rtol=1e-4, atol=1e-4)


def test_with_head_exports_the_fine_tuned_classifier(tmp_path):
    pretrain_main(tiny_args(tmp_path, "--max_steps", "1", "--fewshot_steps", "0", objective="supervised"))
    ckpt = tmp_path / "run/checkpoints/step_000001"
    model, _ = build_timm_model(ckpt, with_head=True)
    assert model.num_classes == 10
    import timm

    export_main([str(ckpt), "--out", str(tmp_path / "e"), "--with-head"])
    loaded = timm.create_model(f"local-dir:{tmp_path / 'e'}", pretrained=True).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_bad_input_is_refused_clearly(tmp_path):
    with pytest.raises(UsageError, match="not an ssvit checkpoint"):
        export_main([str(tmp_path), "--out", str(tmp_path / "e")])
    pretrain_main(tiny_args(tmp_path, "--max_steps", "1", "--fewshot_steps", "0"))
    ckpt = str(tmp_path / "run/checkpoints/step_000001")
    export_main([ckpt, "--out", str(tmp_path / "e")])
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_main([ckpt, "--out", str(tmp_path / "e")])
    export_main([ckpt, "--out", str(tmp_path / "e"), "--overwrite"])
    with pytest.raises(UsageError, match="no linear classifier"):
        export_main([ckpt, "--out", str(tmp_path / "h"), "--with-head"])


# ---- inspection (paper section 4.5, figure 7) -------------------------------------------------------------


def test_mean_attention_distance_contracts():
    from ssvit.figures import mean_attention_distance

    grid, n = (3, 3), 9
    own = torch.eye(n).expand(2, 4, n, n)  # each head attends only to its own patch
    assert torch.equal(mean_attention_distance(own, grid, 4.0), torch.zeros(4))
    # Uniform attention on a 2x2 grid of 1px patches: from any patch, distances 0, 1, 1, sqrt(2) -> mean (2 + sqrt 2) / 4.
    uniform = torch.full((1, 1, 4, 4), 0.25)
    assert torch.allclose(mean_attention_distance(uniform, (2, 2), 1.0), torch.tensor([(2 + 2**0.5) / 4]))


def test_position_similarity_with_itself_is_one():
    from ssvit.figures import position_similarity

    pos = torch.randn(1, 1 + 16, 8)
    sim = position_similarity(pos, 1, (4, 4))
    assert sim.shape == (4, 4, 4, 4)
    assert torch.allclose(torch.einsum("abab->ab", sim), torch.ones(4, 4))


def test_inspect_writes_the_four_figures_and_their_numbers(tmp_path):
    import json

    from ssvit.figures import main as inspect_main

    pretrain_main(tiny_args(tmp_path, "--max_steps", "1", "--fewshot_steps", "0", "--data", "synthetic:300"))
    out = tmp_path / "inspect"
    inspect_main([str(tmp_path / "run/checkpoints/step_000001"), "--out", str(out), "--num_images", "8"])
    for name in ("patch_embedding_pca", "position_similarity", "attention_distance", "attention_rollout"):
        assert (out / f"{name}.png").stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["mean_attention_distance"]) == 2 and len(summary["mean_attention_distance"][0]) == 2
