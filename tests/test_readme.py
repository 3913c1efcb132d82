"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python examples"
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # pylint: disable=exec-used
    assert namespace["report"]["ratio_to_adamw"] < 1.0
    # The NNX example: head (256 x 10) reaches rank 32 on its short side -> plain Adam.
    by_path = namespace["treatment"].by_path()
    assert by_path["fc1/kernel"].label == "galore" and by_path["head/kernel"].label == "adam"
