"""Configuration contracts: presets + overrides, typed values, unknown keys named, runs reproducible."""

from pathlib import Path

import pytest
import yaml

from ssvit import objectives
from ssvit.config import parse
from ssvit.errors import UsageError

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml") if not p.name.startswith("compare_"))
STUDIES = sorted((Path(__file__).resolve().parents[1] / "configs").glob("compare_*.yaml"))


def test_defaults_are_the_quick_start():
    run = parse([])
    written_out = parse(["--config", "configs/quickstart.yaml"])
    assert written_out.train == run.train and written_out.objective_options == run.objective_options
    assert run.train.objective == "masked_patch" and run.train.data == "synthetic"
    assert run.objective_options.mask_ratio == 0.5 and run.objective_options.target == "mean_color"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_preset_parses(path):
    run = parse(["--config", str(path)])
    assert run.train.objective in objectives.OBJECTIVES


def test_command_line_overrides_config_and_nested_objective_options():
    run = parse(["--config", "configs/cifar10_mpp_cpu.yaml", "--max_steps", "7", "--masked_patch.mask_ratio", "0.15",
                 "--masked_patch.target", "downsampled", "--lr", "3e-4"])  # fmt: skip
    assert run.train.max_steps == 7 and run.train.lr == 3e-4
    assert run.objective_options.mask_ratio == 0.15 and run.objective_options.target == "downsampled"


def test_hf_and_hyphen_spellings_and_bare_resume():
    run = parse(["--output-dir", "x", "--max-steps", "3", "--resume"])
    assert run.train.output_dir == "x" and run.train.max_steps == 3 and run.train.resume == "latest"


def test_unknown_key_in_config_names_valid_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_step: 10\n")
    with pytest.raises(UsageError, match=r"unknown key 'max_step' \(did you mean max_steps\?\)"):
        parse(["--config", str(bad)])
    bad.write_text("masked_patch: {mask_ration: 0.5}\n")
    with pytest.raises(UsageError, match=r"unknown key 'masked_patch.mask_ration' \(did you mean mask_ratio\?\)"):
        parse(["--config", str(bad)])


def test_unknown_flag_and_wrong_type_are_errors():
    with pytest.raises(UsageError, match="learning_rate"):
        parse(["--learning_rate", "0.1"])
    with pytest.raises(UsageError, match="max_steps"):
        parse(["--max_steps", "ten"])


def test_unknown_objective_lists_the_valid_ones():
    from ssvit import objectives

    with pytest.raises(ValueError, match=f"Unknown objective 'rotaton'. Available objectives are: {', '.join(sorted(objectives.OBJECTIVES))}."):
        parse(["--objective", "rotaton"])


def test_dumped_config_reproduces_the_run(tmp_path):
    run = parse(["--max_steps", "11", "--masked_patch.mask_ratio", "0.15", "--mixed_precision", "null"])
    saved = tmp_path / "config.yaml"
    saved.write_text(run.dump())
    again = parse(["--config", str(saved)])
    assert again.train == run.train and again.objective_options == run.objective_options
    assert yaml.safe_load(saved.read_text())["masked_patch"]["mask_ratio"] == 0.15


def test_a_config_written_before_a_key_was_renamed_still_reproduces_its_run(tmp_path):
    """init_student (a run's config.yaml before --init_checkpoint_key): --config reads it as the new key."""
    run = parse(["--max_steps", "11"])
    for old, new in ((True, "backbone"), (False, None)):
        values = yaml.safe_load(run.dump())
        values = {**{k: v for k, v in values.items() if k != "init_checkpoint_key"}, "init_student": old}
        saved = tmp_path / f"config_{old}.yaml"
        saved.write_text(yaml.safe_dump(values))
        again = parse(["--config", str(saved)])
        assert again.train.init_checkpoint_key == new and again.train.max_steps == 11


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_study_preset_parses_and_its_runs_take_valid_flags(path):
    from jsonargparse import ActionConfigFile, ArgumentParser

    from ssvit.compare import Study, flags

    p = ArgumentParser()
    p.add_argument("--config", action=ActionConfigFile)
    p.add_class_arguments(Study)
    study = Study(**{k: v for k, v in vars(p.parse_args(["--config", str(path)])).items() if k in Study.__dataclass_fields__})
    for name, extra in study.objectives.items():
        parse([*flags(study.base), "--objective", name, *flags({**study.pretrain, **extra})])
    parse([*flags(study.base), "--objective", "supervised", *flags({**study.pretrain, **study.supervised})])
    parse([*flags(study.base), *flags(study.finetune)])
    first = next(iter(study.objectives))
    for extra in study.ablations.values():
        parse([*flags(study.base), "--objective", first, *flags({**study.pretrain, **study.objectives[first], **extra})])


def test_entry_scripts_run_as_files():
    """`accelerate launch ssvit/<script>.py` runs the file as a script, with ssvit/ first on sys.path: no module there may
    shadow one of the standard library's or an installed package's, and each script runs its --help so."""
    import importlib.util
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    names = {p.stem for p in (root / "ssvit").glob("*.py")} - {"__init__", "__main__"}
    shadowing = {n for n in names if n in sys.stdlib_module_names or importlib.util.find_spec(n) is not None}
    assert shadowing == set()
    scripts = ["pretrain", "finetune", "compare", "evaluate", "export", "figures", "bench", "prepare"]
    # One interpreter for all (each script is mostly its imports): as `python ssvit/<script>.py --help` runs it.
    program = (
        "import runpy, sys\n"
        "sys.path[0] = 'ssvit'\n"
        f"for script in {scripts!r}:\n"
        "    sys.argv = [f'ssvit/{script}.py', '--help']\n"
        "    try:\n"
        "        runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), (script, e.code)\n"
        "    print('ran', script, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0 and done.stderr.count("ran ") == len(scripts), done.stderr[-3000:]
