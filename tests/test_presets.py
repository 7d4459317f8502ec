"""Every preset in configs/ trains, as written, for a couple of steps with size overrides appended (big_vision's
`runlocal`): the recipes users run are the recipes the tests exercise."""

import json

import pytest
import yaml

from ssvit import objectives

from ssvit import compare, finetune, pretrain

from conftest import CIFAR, IMAGENET_SAMPLE, ROOT, tiny_args

PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
# Shrink the model, the run and the held-out test split, nothing else: data, objective, optimizer and schedule stay
# the preset's.
TINY = {"max_steps": 2, "warmup_steps": 1, "eval_steps": 2, "save_steps": 2, "eval_batches": 1, "fewshot_steps": 0,
        "report_to": [], "mixed_precision": "no", "cpu_threads": 1, "dataloader_num_workers": 0, "batch_size": 8}  # fmt: skip
SHRINK_VIT = {"depth": 1, "embed_dim": 48, "num_heads": 3}
SHRINK_DECODER = {"mae": {"mae.decoder_embed_dim": 16, "mae.decoder_depth": 1, "mae.decoder_num_heads": 2},
                  "dino": {"dino.out_dim": 64, "dino.hidden_dim": 32, "dino.bottleneck_dim": 16},
                  "mocov3": {"mocov3.mlp_dim": 32, "mocov3.dim": 16}}
"""MAE's decoder and DINO's and MoCo v3's heads shrunk with the encoder: a study matches FLOPs, and the default decoder would cost 15x
the shrunk encoder (DINO's 65,536-output head, 16M parameters, far more)."""
# Local files the tests read instead of the hub datasets the presets name (no test may download).
LOCAL_DATA = {"uoft-cs/cifar10": f"parquet:{CIFAR}", "ILSVRC/imagenet-1k": f"imagefolder:{IMAGENET_SAMPLE}"}


def tiny(flags: dict) -> dict:
    """The preset's flags with the run shrunk (ViTs to one narrow block; BiT keeps its architecture)."""
    out = {**flags, **TINY}
    if str(flags.get("model", "vit")).startswith("vit"):
        out["model_kwargs"] = {**(flags.get("model_kwargs") or {}), **SHRINK_VIT}
    for objective, shrunk in SHRINK_DECODER.items():
        if objective in flags:
            out[objective] = {**flags[objective], **{k.partition(".")[2]: v for k, v in shrunk.items()}}
    out["data"] = LOCAL_DATA.get(flags.get("data"), flags.get("data", "synthetic"))
    if flags.get("test_fraction"):  # read whole at each run's end: 500 of CIFAR-10's images rather than 5,000
        out["test_fraction"] = 0.01
    return out


def preset_data_is_the_users(data: str) -> bool:
    """A preset names data as a user has it: built in, or a hub name; never a path on this machine."""
    return data.startswith("synthetic") or data in LOCAL_DATA


def needs_shared(data: str) -> None:
    if ("cifar10" in data and not CIFAR.exists()) or ("imagenet-sample" in data and not IMAGENET_SAMPLE.exists()):
        pytest.skip(f"../shared data for {data} not present")


def argv(flags: dict) -> list[str]:
    nested = set(objectives.OBJECTIVES)  # objective options: a section per objective
    return compare.flags({k: v for k, v in flags.items() if k not in nested}) + compare.flags(
        {f"{o}.{k}": v for o in nested for k, v in (flags.get(o) or {}).items()}
    )


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_trains_for_two_steps(path, tmp_path, monkeypatch):
    """By name (`--config cifar10_mpp_cpu`), from a folder that is not the repository."""
    monkeypatch.chdir(tmp_path)
    preset = yaml.safe_load(path.read_text())
    assert preset_data_is_the_users(preset.get("data") or preset.get("base", {}).get("data", "synthetic"))
    if path.stem.startswith("compare_"):
        run_study_preset(preset, tmp_path, path.stem)
        return
    flags = tiny({k: v for k, v in preset.items()})
    needs_shared(flags["data"])
    flags["output_dir"] = str(tmp_path / "run")
    if path.stem.startswith("finetune"):  # a fine-tuning preset starts from a pretrained checkpoint
        pretrain.main(tiny_args(tmp_path / "pre", "--max_steps", "1", "--fewshot_steps", "0"))
        init = str(tmp_path / "pre/run/checkpoints/step_000001")
        flags.pop("model_kwargs")  # the architecture is the checkpoint's
        result = finetune.main(["--init", init, "--config", path.stem, *argv({**flags, "data": "synthetic:200"})])
    else:
        result = pretrain.main(["--config", path.stem, *argv(flags)])
    assert result["steps"] == 2
    saved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    for key in ("objective", "optimizer", "lr", "weight_decay", "lr_scheduler_type", "img_size"):
        if key in preset:
            assert saved[key] == preset[key], key  # the preset's recipe ran, not the defaults
    assert json.loads((tmp_path / "run/results.json").read_text())["steps"] == 2


def shrunk(flags: dict) -> dict:
    """A study's own step counts (an objective's, at equal FLOPs) cut to the tiny run's."""
    return {k: TINY[k] for k in ("max_steps", "warmup_steps") if k in flags}


def tiny_study_of(study: dict) -> dict:
    """A study preset shrunk: tiny runs, one label fraction, one seed, one ablation, one budget (no output_dir)."""
    tiny_study = {
        **study,
        "base": tiny(study["base"]),
        "pretrain": {**study["pretrain"], **{k: TINY[k] for k in ("max_steps", "warmup_steps", "batch_size")}},
        "objectives": {o: {**v, **SHRINK_DECODER.get(o, {}), **shrunk(v)} for o, v in study.get("objectives", {"masked_patch": {}}).items()},
        "supervised": {**study.get("supervised", {}), **shrunk(study.get("supervised", {}))},
        "finetune": {**study["finetune"], **{k: TINY[k] for k in ("max_steps", "warmup_steps", "batch_size")}},
        "label_fractions": study["label_fractions"][:1],
        "seeds": study["seeds"][:1],
        "ablations": {name: {**extra, **shrunk(extra)} for name, extra in list(study.get("ablations", {}).items())[:1]},
        # the frozen-feature evaluation is test_compare's: here, that the preset's recipe runs (unless it is all it does)
        "frozen": not study["label_fractions"],
        "frozen_max_train": 500,
    }
    tiny_study.pop("output_dir", None)
    if study.get("joint"):  # the aux objective's decoder or head shrunk with the encoder, as its pretraining's
        tiny_study["joint"] = {**study["joint"], **SHRINK_DECODER.get(study["joint"]["aux"], {})}
    if study.get("budgets"):  # compute on the x-axis: one budget of 32 images and one share, whole batches of 8
        # (256 with semi-supervised arms: they pay about 10x per labelled image and still need a whole batch)
        tiny_study["budgets"], tiny_study["pretrain_shares"] = [256 if study.get("semi") else 32], study["pretrain_shares"][:1]
    return tiny_study


def _twins() -> dict[str, str]:
    """Study presets whose shrunk form equals an earlier preset's (a quick variant that differs from its full study only
    in what the test shrinks): each is trained once, under the first name, whichever tests are selected."""
    first, twins = {}, {}
    for path in PRESETS:
        preset = yaml.safe_load(path.read_text())
        if path.stem.startswith("compare_"):
            form = json.dumps(tiny_study_of(preset), sort_keys=True)
            twins[path.stem] = first.setdefault(form, path.stem)
    return {stem: twin for stem, twin in twins.items() if twin != stem}


TWINS = _twins()


def run_study_preset(study: dict, tmp_path, name: str) -> None:
    compare.Study(**study)  # every key of the preset is one of the study's
    if name in TWINS:  # trained by its twin's test, which always runs it
        return
    tiny_study = {**tiny_study_of(study), "output_dir": str(tmp_path / "study")}
    needs_shared(tiny_study["base"]["data"])
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(tiny_study))
    rows = compare.main(["--config", str(config)])
    if study.get("budgets"):
        arms = {f"{o}{s:g}" for o in study.get("objectives", {"masked_patch": {}}) for s in tiny_study["pretrain_shares"]}
        readouts = {f"{a}+{r}" for a in arms for r in [*study.get("readouts", {}), *(["lsq"] if study.get("lsq") else [])]}
        semi = {"semi", *(f"{a}+semi" for a in arms)} if study.get("semi") else set()
        semi |= {s.replace("semi", "ft+semi") for s in semi} if study.get("semi_after_finetune") else set()
        arms |= {"scratch", *readouts, *semi, *(["joint"] if study.get("joint") else [])}
        assert {r["arm"] for r in rows if r["kind"] == "budget"} == arms
        assert {r["budget"] for r in rows if r["kind"] == "budget"} == set(tiny_study["budgets"])
        assert (tmp_path / "study/accuracy_vs_compute.png").exists()
        return
    if not study["label_fractions"]:  # frozen features only
        assert {r["arm"] for r in rows} == {"random weights", *study["arms"]} and {r["kind"] for r in rows} == {"frozen"}
        return
    arms = {r["arm"] for r in rows if r["kind"] == "finetune"}
    expected = compare.Study(**{k: v for k, v in tiny_study.items() if k in compare.Study.__dataclass_fields__}).arm_names()
    assert arms == set(expected) - ({"scratch_matched"} if tiny_study["label_fractions"] == [1.0] else set())
    assert (tmp_path / "study/results.md").exists()
