"""The Python examples of the README and the user guide run as written."""

import pathlib
import re
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide.md"


def _run_python_blocks(path):
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert blocks, f"{path.name} has no python examples"
    namespace = {}
    with warnings.catch_warnings():
        # The docs show the current API: a 0.2.0 spelling (its warning points at the
        # changelog) is an error here.
        warnings.filterwarnings("error", message=r".*CHANGELOG\.md", category=DeprecationWarning)
        for block in blocks:
            exec(compile(block, str(path), "exec"), namespace)  # pylint: disable=exec-used
    return namespace


def test_readme_python_examples_run():
    namespace = _run_python_blocks(README)
    assert namespace["report"]["ratio_to_adamw"] < 1.0
    # The NNX example: head (256 x 10) reaches rank 32 on its short side -> plain Adam.
    by_path = namespace["treatment"].by_path()
    assert by_path["fc1/kernel"].label == "galore" and by_path["head/kernel"].label == "adam"


def test_guide_python_examples_run():
    # Low-bit state, layer-wise updates, bf16 + float32 master, sharding on a mesh.
    namespace = _run_python_blocks(GUIDE)
    assert namespace["state"] is not None and "loss" in namespace["metrics"]
