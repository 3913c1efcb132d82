"""The import contracts of .ci/check_imports.py hold here, and the checker finds a
broken layer rule and an import cycle (one of them through a function-local import)."""

import importlib.util
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHECKER = REPO / ".ci" / "check_imports.py"


def _checker():
    spec = importlib.util.spec_from_file_location("check_imports", CHECKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_repository_keeps_its_import_contracts():
    assert _checker().check(REPO) == []


def test_a_broken_layer_rule_and_a_cycle_are_reported(tmp_path):
    _write(
        tmp_path,
        {
            "galore_jax/__init__.py": "from galore_jax.core import update\n",
            "galore_jax/core.py": "import jax\n\nimport flax.nnx as nnx\n\n\ndef update(): ...\n",
            "models/__init__.py": "",
            "models/net.py": "import jax\n",
            "training/__init__.py": "",
            "training/steps.py": "from . import loop\n",
            "training/loop.py": """\
                import numpy as np


                def run():
                    from training.steps import build  # function-local: a cycle all the same
                    from tasks.lm import task
            """,
            "tasks/__init__.py": "",
            "tasks/lm/__init__.py": "",
            "tasks/lm/task.py": "from models import net\n",
            "train.py": "from training import steps\n",
        },
    )
    violations = _checker().check(tmp_path)
    assert violations == [
        "galore_jax/core.py:3: galore_jax imports flax "
        "(the library imports jax, optax and numpy only)",
        "training/loop.py:6: training imports tasks "
        "(the runtime is task-agnostic: tasks build on it)",
        "training/loop.py:5: import cycle: training.loop -> training.steps -> training.loop",
    ]


def test_the_command_line_prints_each_violation_and_fails(tmp_path, capsys):
    _write(tmp_path, {"models/__init__.py": "", "models/net.py": "\n\nimport galore_jax\n"})
    checker = _checker()
    assert checker.main(["check_imports.py", str(tmp_path)]) == 1
    assert capsys.readouterr().out == (
        "models/net.py:3: models imports galore_jax (models import jax, flax and numpy only)\n"
    )
    assert checker.main(["check_imports.py", str(tmp_path / "models")]) == 0  # nothing to check
