"""The extension point docs/objectives.md shows: a new objective is one registered file, and trains with no other edit."""

import importlib.util
import sys

from ssvit import objectives
from ssvit.pretrain import main

from conftest import ROOT, tiny_args


def test_the_example_objective_registers_and_trains(tmp_path):
    """examples/rotation.py, imported as a module of objectives/ is (ssvit.objectives.<file name>), then trained. With
    a copy already in objectives/ (what docs/objectives.md tells a user to do), that copy is the one trained and stays
    registered."""
    name = "ssvit.objectives.rotation"
    installed = "rotation" in objectives.OBJECTIVES
    if not installed:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "rotation.py")
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
    try:
        if not installed:
            spec.loader.exec_module(module)
        assert "rotation" in objectives.OBJECTIVES
        result = main(tiny_args(tmp_path, "--max_steps", "2", "--fewshot_steps", "0", "--rotation.label_smoothing", "0.1",
                                objective="rotation"))  # fmt: skip
        assert result["steps"] == 2 and 0 <= result["val/rotation_accuracy"] <= 1
    finally:
        if not installed:
            objectives.OBJECTIVES.pop("rotation", None)
            sys.modules.pop(name)
