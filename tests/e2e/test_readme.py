"""The Python examples of the README and the user guide run as written."""

import pathlib
import re
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide.md"


def _python_blocks(path):
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert blocks, f"{path.name} has no python examples"
    return blocks


def _run_python_blocks(path, blocks=None):
    namespace = {}
    with warnings.catch_warnings():
        # The docs show the current API: a 0.2.0 spelling (its warning points at the
        # changelog) is an error here.
        warnings.filterwarnings("error", message=r".*CHANGELOG\.md", category=DeprecationWarning)
        for block in blocks or _python_blocks(path):
            exec(compile(block, str(path), "exec"), namespace)  # pylint: disable=exec-used
    return namespace


def _examples(path):
    """The blocks as examples: one starts at each block with its own imports and takes
    the blocks after it that build on it (each example runs in a fresh namespace)."""
    examples = []
    for block in _python_blocks(path):
        if not examples or re.search(r"^(import|from) ", block, re.M):
            examples.append([])
        examples[-1].append(block)
    return examples


def test_readme_python_examples_run():
    namespace = _run_python_blocks(README)
    assert namespace["report"]["ratio_to_adamw"] < 1.0
    # The NNX example: head (256 x 10) reaches rank 32 on its short side -> plain Adam.
    by_path = namespace["treatment"].by_path()
    assert by_path["fc1/kernel"].label == "galore" and by_path["head/kernel"].label == "adam"


GUIDE_EXAMPLES = _examples(GUIDE)


def _uses(index, name):
    return any(re.search(rf"\b{name}\b", block) for block in GUIDE_EXAMPLES[index])


@pytest.mark.parametrize("index", range(len(GUIDE_EXAMPLES)))
def test_guide_python_examples_run(index):
    # Low-bit state, layer-wise updates, bf16 + float32 master, sharding on a mesh: one
    # test per example, so they spread over the test workers.
    namespace = _run_python_blocks(GUIDE, GUIDE_EXAMPLES[index])
    if _uses(index, "metrics"):
        assert "loss" in namespace["metrics"]
    if _uses(index, "state"):
        assert namespace["state"] is not None


def test_guide_examples_include_a_step_with_metrics_and_a_state():
    indices = range(len(GUIDE_EXAMPLES))
    assert any(_uses(i, "metrics") for i in indices)
    assert any(_uses(i, "state") for i in indices)
