"""benchmarks/convergence.py --sweep: which learning rate counts as best, when the grid grows."""

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import convergence  # noqa: E402


def _run(optimizer, lr, seed, loss, state=1000):
    return {
        "optimizer": optimizer,
        "lr": lr,
        "seed": seed,
        "label": f"{optimizer}_lr{lr:g}_seed{seed}",
        "final_val_loss": loss,
        "state_bytes": state,
        "tokens_per_s": 100.0,
        "val_curve": [[0, loss + 1], [10, loss]],
        "train_curve": [],
    }


RESULTS = [
    _run("adamw", 1e-3, 0, 2.0),
    _run("adamw", 3e-3, 0, 1.8),
    _run("adamw", 1e-2, 0, 1.9),
    _run("adamw", 3e-3, 1, 1.9),
    _run("galore", 3e-3, 0, 2.2, 400),
    _run("galore", 1e-2, 0, 2.0, 400),
    _run("galore", 3e-2, 0, 1.95, 400),
]


def test_best_lr_is_chosen_on_the_seeds_every_lr_ran():
    assert convergence.best_lr(RESULTS, "adamw") == 3e-3
    # A second seed of the best LR (worse than the others' first) does not unseat it.
    worse = [*RESULTS, _run("adamw", 3e-3, 1, 2.5)]
    assert convergence.best_lr(worse, "adamw") == 3e-3
    assert convergence.best_lr(RESULTS, "galore") == 3e-2
    assert convergence.best_lr(RESULTS, "muon") is None
    tuned = convergence.at_best_lr(RESULTS)
    assert sorted((r["optimizer"], r["lr"], r["seed"]) for r in tuned) == [
        ("adamw", 3e-3, 0),
        ("adamw", 3e-3, 1),
        ("galore", 3e-2, 0),
    ]


def test_a_best_lr_at_the_end_of_the_grid_extends_it_once():
    assert convergence.edge_extension(RESULTS, "galore", (3e-3, 1e-2, 3e-2)) == [0.09]
    assert convergence.edge_extension(RESULTS, "adamw", (1e-3, 3e-3, 1e-2)) == []
    low = [_run("muon", 1e-3, 0, 1.0), _run("muon", 3e-3, 0, 2.0)]
    assert convergence.edge_extension(low, "muon", (1e-3, 3e-3)) == [0.000333]


def test_best_lr_table_compares_means_with_adamw():
    table = convergence.best_lr_table(RESULTS)
    galore = next(line for line in table.splitlines() if line.startswith("| galore"))
    cells = [c.strip() for c in galore.strip("|").split("|")]
    # optimizer, LRs tried, best lr, seeds, mean loss, ppl, vs adamw, bytes, x adamw, tokens/s
    assert cells[1] == "0.003, 0.01, 0.03" and cells[2] == "0.03" and cells[3] == "1"
    assert cells[6] == f"{100 * (1.95 / 1.85 - 1):+.2f}%"
    assert cells[8] == "0.400"


def test_lr_grid_flag_replaces_one_grid_and_names_a_bad_one():
    args = convergence.parse_args(["--lr-grid", "muon=0.03,0.01"])
    grids = convergence.lr_grids(args)
    assert grids["muon"] == (0.01, 0.03) and grids["adamw"] == convergence.LR_GRID["adamw"]
    with pytest.raises(SystemExit, match="NAME=LR"):
        convergence.lr_grids(convergence.parse_args(["--lr-grid", "nope=1"]))


def test_reuse_needs_every_value_the_command_sets():
    wanted = {"seed": 1, "model": {"vocab_size": None, "hidden_size": 32}, "lr": 0.01}
    saved = {"seed": 1, "model": {"vocab_size": 384, "hidden_size": 32}, "lr": 0.01, "x": 2}
    assert convergence._agrees(wanted, saved)  # None: the task fills it in
    assert not convergence._agrees({**wanted, "lr": 0.009000000000000001}, saved)
    assert not convergence._agrees({**wanted, "model": {"hidden_size": 64}}, saved)
