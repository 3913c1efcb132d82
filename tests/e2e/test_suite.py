"""benchmarks/suite.sh: every GPU part's command is one its script accepts.

Device time is scarce and a suite run is one call: a misspelt optimizer, flag or
config override would only show on the GPU. Each GPU part runs here with a stand-in
interpreter that parses the script's arguments (and, for the train-step scripts,
builds every optimizer variant's config) instead of running the benchmark.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "benchmarks" / "suite.sh"

# argv: script.py ARGS... -> parse ARGS with the script's parser; -c CODE -> run CODE.
STAND_IN = f"""#!{sys.executable}
import importlib, runpy, sys
from pathlib import Path
if sys.argv[1] == "-c":
    sys.argv = sys.argv[1:]
    exec(sys.argv[1])
    sys.exit(0)
script = Path(sys.argv[1])
sys.path.insert(0, str(script.parent))
module = importlib.import_module(script.stem)
args = module.parse_args(sys.argv[2:])
if script.stem in ("train_step", "update_cost"):
    import train_step
    for name in args.optimizers:
        train_step.load(args, name)
print("parsed", script.stem, getattr(args, "optimizers", ""))
"""


def _gpu_parts() -> list:
    text = SUITE.read_text()
    default = re.search(r"^  parts=\((env [^)]*)\)$", text, flags=re.M)
    assert default, "suite.sh's default (GPU) part list not found"
    return default.group(1).split()


def test_suite_parses_as_bash():
    subprocess.run(["bash", "-n", str(SUITE)], check=True)


@pytest.mark.parametrize("part", _gpu_parts())
def test_every_gpu_part_is_a_valid_command(part, tmp_path):
    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(python), "HOME": str(tmp_path)}
    subprocess.run(["bash", str(SUITE), str(out), part], check=True, env=env, timeout=300)
    log = (out / "suite.log").read_text()
    assert f"== {part}: exit 0 " in log, log + (out / f"{part}.log").read_text()
    if part != "env":
        assert "parsed" in (out / f"{part}.md").read_text()


def test_an_unknown_part_is_refused_before_any_part_runs(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SUITE), str(out), "env", "step_1b_fastt"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unknown part: step_1b_fastt" in proc.stderr
    assert not out.exists()
