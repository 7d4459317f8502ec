"""One command style: every command parses with the same library, answers a bad flag with one line and exit status
2 (no usage dump, no traceback), and is reachable as `ssvit <command>`; presets are found by name from any folder."""

import importlib
import subprocess
import sys

import pytest

from ssvit import cli
from ssvit.errors import UsageError

from conftest import tiny_args


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_a_bad_flag_is_one_line_for_every_command(name, capsys):
    module = importlib.import_module(f"ssvit.{name}")
    for main, argv in ((module.main, ["--no_such_flag", "1"]), (cli.main, [name, "--no_such_flag", "1"])):
        with pytest.raises(SystemExit) as stop:
            main(argv, cli=True) if main is module.main else cli_main(argv)
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and len(err.splitlines()) == 1, err
        assert "--no_such_flag" in err or "required" in err, err
        assert "Traceback" not in err


def cli_main(argv):
    """`ssvit ...` as a console script runs it: sys.argv, no argument."""
    saved = sys.argv
    sys.argv = ["ssvit", *argv]
    try:
        return cli.main()
    finally:
        sys.argv = saved


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_prints_help_the_same_way(name, capsys):
    module = importlib.import_module(f"ssvit.{name}")
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"], cli=True)
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith(f"usage: ssvit-{name} ") and "--help" in out


def test_ssvit_help_lists_every_command_and_the_presets(capsys):
    assert cli_main(["--help"]) is None
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in cli.COMMANDS) and "cifar10_mpp_cpu" in out


def test_an_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["pretrian"])
    assert stop.value.code == 2 and "unknown command 'pretrian'" in capsys.readouterr().err


def test_a_command_line_returns_nothing_so_console_scripts_exit_0(tmp_path, capsys):
    """A console script exits with what main() returns: a results dict there made every successful run exit 1
    and print the dict."""
    from ssvit import pretrain

    assert pretrain.main(tiny_args(tmp_path, "--max_steps", "1", "--fewshot_steps", "0"), cli=True) is None
    assert isinstance(pretrain.main(tiny_args(tmp_path / "b", "--max_steps", "1", "--fewshot_steps", "0")), dict)


def test_the_console_script_runs_a_command():
    bin_dir = __import__("pathlib").Path(sys.executable).parent
    script = bin_dir / "ssvit"
    if not script.exists():
        pytest.skip("ssvit is not installed as a console script in this environment")
    done = subprocess.run([str(script), "pretrain", "--max_stepz", "3"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "ssvit pretrain: error: unrecognized arguments: --max_stepz 3. `ssvit-pretrain --help` lists the options."]


def test_presets_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.config_file("cifar10_mpp_cpu") == cli.preset_dir() / "cifar10_mpp_cpu.yaml"
    assert cli.config_file("configs/cifar10_mpp_cpu.yaml") == cli.preset_dir() / "cifar10_mpp_cpu.yaml"
    (tmp_path / "mine.yaml").write_text("max_steps: 3\n")
    assert cli.config_file("mine.yaml").name == "mine.yaml"  # a file of the user's comes first
    with pytest.raises(UsageError, match="no preset of that name .did you mean cifar10_mpp_cpu"):
        cli.config_file("cifar10_mp_cpu")


def test_flags_take_dashes_or_underscores():
    assert cli.normalize(["--output-dir", "x", "--max-steps=3", "--data", "a-b"]) == ["--output_dir", "x", "--max_steps=3", "--data", "a-b"]


def test_a_mapping_flag_written_without_spaces_says_how_to_write_it(tmp_path):
    """`--model_kwargs {patch_size:4,depth:2}` is not YAML's mapping (a flow mapping needs a space after each colon),
    and the parser's answer was three type names and 'Given value type: <class 'str'>'. It now names the flag and
    gives the value as it should be written, in the pretraining commands and in a study's mapping options alike."""
    from ssvit import compare, pretrain

    with pytest.raises(UsageError) as refused:
        pretrain.main(["--model_kwargs", "{patch_size:4,depth:2}", "--output_dir", str(tmp_path / "run")])
    assert str(refused.value) == ("--model_kwargs {patch_size:4,depth:2}: not a mapping: YAML needs a space after each "
                                  "colon, as in --model_kwargs \"{patch_size: 4, depth: 2}\".")  # fmt: skip
    with pytest.raises(UsageError, match=r"^--readouts=\{ld:\{layer_decay:0.75\}\}: not a mapping: YAML needs a space after "
                                         r"each colon, as in --readouts \"\{ld: \{layer_decay: 0.75\}\}\"\.$"):  # fmt: skip
        compare.main(["--config", "compare_cifar10_semi_cpu_quick", "--readouts={ld:{layer_decay:0.75}}"])
    assert not (tmp_path / "run").exists()
