"""One command-line style for every ssvit command: the same parser library (jsonargparse), the same `--help`, bad
input as one line through the same error path (ssvit.errors), presets found by name. `ssvit --help` lists the
commands; `ssvit pretrain ...`, `ssvit-pretrain ...`, `python -m ssvit.pretrain ...` and
`accelerate launch ssvit/pretrain.py ...` are the same command.
"""

from __future__ import annotations

import importlib
import re
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Optional

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from ssvit.errors import UsageError, command

COMMANDS = {
    "pretrain": "pretrain a ViT (or BiT) with any registered objective",
    "finetune": "fine-tune a pretrained backbone with the ViT paper's transfer protocol",
    "evaluate": "frozen-feature evaluation: few-shot linear, linear probe, k-NN",
    "export": "write a checkpoint's backbone as a plain timm model folder (and ONNX)",
    "figures": "the ViT paper's figure 7 for a checkpoint: filters, position embeddings, attention",
    "compare": "a study: objectives against scratch at equal compute, paired by seed",
    "prepare": "turn images into parquet shards in the hub layout for data at scale",
    "bench": "time the training step, the input pipeline and the presets' cost",
}
"""Every command: ssvit/<name>.py with a main(argv), installed as the console script ssvit-<name>."""


def make_parser(prog: str, doc: Optional[str], config: bool = False) -> ArgumentParser:
    """A command's parser: no abbreviations (--max_step must not silently mean --max_steps), errors raised to
    parse_args, which makes them one line; with config, a --config that takes a preset name or a YAML file."""
    parser = ArgumentParser(prog=prog, description=(doc or "").strip().splitlines()[0], exit_on_error=False, allow_abbrev=False)
    if config:
        parser.add_argument("--config", action=ActionConfigFile,
                            help="A preset by name (e.g. cifar10_mpp_cpu; `ssvit --help` lists them) or a YAML file such as a run's config.yaml.")  # fmt: skip
    return parser


def parse_args(parser: ArgumentParser, argv: Optional[list[str]]) -> Namespace:
    """Parse argv (sys.argv[1:] when None) after `normalize`; a parser error becomes one UsageError line."""
    argv = normalize(sys.argv[1:] if argv is None else list(argv))
    try:
        return parser.parse_args(argv)
    except ArgumentError as e:  # one line, not the usage text first
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise UsageError(mapping_hint(message, argv) or f"{message}. `{parser.prog} --help` lists the options.") from None


def mapping_hint(message: str, argv: list[str]) -> Optional[str]:
    """For a mapping flag given `{patch_size:4}`: YAML reads a flow mapping's `key:value` without a space as one
    string, and the parser's answer lists type names. Say what to write instead (None for any other error)."""
    key = re.search(r'Parser key "([^"]+)"', message)
    if key is None or "Expected a <class 'dict'>" not in message:
        return None
    flag = f"--{key.group(1)}"
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name == flag and (eq or i + 1 < len(argv)):
            value = value if eq else argv[i + 1]
            spaced = re.sub(r"([:,])(?=\S)", r"\1 ", value)
            try:
                fixed = isinstance(yaml.safe_load(spaced), dict)
            except yaml.YAMLError:
                fixed = False
            if fixed:
                given = arg if eq else f"{flag} {value}"
                return f"{given}: not a mapping: YAML needs a space after each colon, as in {flag} \"{spaced}\"."
    return None


def normalize(argv: list[str]) -> list[str]:
    """--output-dir is --output_dir (flags are spelled with underscores, as Hugging Face's; dashes are accepted), and
    a --config that names a preset becomes its file."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "-" in arg[2:].split("=")[0]:
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        if out and out[-1] == "--config":
            arg = str(config_file(arg))
        elif arg.startswith("--config="):
            arg = f"--config={config_file(arg.partition('=')[2])}"
        out.append(arg)
    return out


# ----------------------------------------------------------------------------------------------------------
# Presets: configs/ in a source checkout, installed as ssvit/configs (pyproject's package-dir)


def preset_dir() -> Path:
    from ssvit import configs

    return Path(next(iter(configs.__path__)))


def presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def config_file(value: str) -> Path:
    """What --config VALUE reads: an existing file as given, else the preset of that name (`cifar10_mpp_cpu`, also
    spelled `configs/cifar10_mpp_cpu.yaml` as in a checkout). A name that is neither is refused with the presets."""
    path = Path(value)
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if path.parent in (Path("."), Path("configs")) and (preset_dir() / f"{name}.yaml").is_file():
        return preset_dir() / f"{name}.yaml"
    if path.exists():  # a folder, and no preset of its name: check_config_file says what it is
        return path
    import difflib

    close = difflib.get_close_matches(name, presets(), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UsageError(f"--config {value}: no such file, and no preset of that name{hint}. "
                     f"Give a YAML file, or a preset: {', '.join(presets())}.")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# `ssvit <command> ...`


def main(argv: Optional[list[str]] = None):
    """`ssvit <command> [options]`: the command's own main, its errors named `ssvit <command>`."""
    cli = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        print("usage: ssvit <command> [options]   (`ssvit <command> --help` lists a command's options)\n\ncommands:")
        print("\n".join(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()))
        print(f"\npresets (--config <name>): {', '.join(presets())}")
        return None
    if argv[0] not in COMMANDS:
        return command("ssvit")(_unknown_command)(argv, cli=cli)
    module = importlib.import_module(f"ssvit.{argv[0]}")
    return command(f"ssvit {argv[0]}")(module.run_command)(argv[1:], cli=cli)


def _unknown_command(argv: list[str]):
    raise UsageError(f"unknown command {argv[0]!r}. The commands are: {', '.join(COMMANDS)} (`ssvit --help`).")
