"""The extension point README shows: a new objective is one registered file, and trains with no other edit."""

import re
import sys
import types

import objectives
from ssvit.pretrain import main

from conftest import ROOT, tiny_args


def test_readme_objective_example_registers_and_trains(tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n# objectives/rotation.py\n(.*?)```", readme, re.S).group(1)
    module = types.ModuleType("objectives.rotation")
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, "objectives/rotation.py", "exec"), module.__dict__)
        assert "rotation" in objectives.OBJECTIVES
        result = main(tiny_args(tmp_path, "--max_steps", "2", "--fewshot_steps", "0", "--rotation.label_smoothing", "0.1",
                                objective="rotation"))  # fmt: skip
        assert result["steps"] == 2 and 0 <= result["val/rotation_accuracy"] <= 1
    finally:
        objectives.OBJECTIVES.pop("rotation", None)
        sys.modules.pop(module.__name__)
