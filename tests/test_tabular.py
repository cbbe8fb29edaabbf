"""tabular_meanexp.py: the residual update, the gridworld, value iteration, and the vectorized sweep against a plain
per-step loop that consumes the same random draws (the layout the script documents: rng.random((4, runs)) per step,
rows explore, choice, noise, direction)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

import tabular_meanexp as tab

GOAL = 24


def moves_by_hand(s: int, d: int) -> int:
    """The 5x5 grid, written out: up +5, down -5, left -1, right +1, off the grid stays."""
    row, col = divmod(s, 5)
    row, col = {0: (row + 1, col), 1: (row - 1, col), 2: (row, col - 1), 3: (row, col + 1)}[d]
    return row * 5 + col if 0 <= row < 5 and 0 <= col < 5 else s


def plain_loop(k, alpha, run, runs, steps, seed, noise="direction", residual=True, noise_prob=0.25, eps=0.1, gamma=0.95):
    """One agent, one step at a time. residual=False is textbook Q-learning on a Q table (meant for k = 0).
    Returns (completion times, final Q)."""
    values = np.zeros((25, 4))
    s, completions = 0, []
    rng = np.random.default_rng(seed)
    for t in range(steps):
        explore_u, choice_u, noise_u, direction_u = rng.random((4, runs))[:, run]
        q = values + k * values.mean(axis=1, keepdims=True) if residual else values
        if explore_u < eps:
            a = int(choice_u * 4)
        else:
            ties = np.flatnonzero(q[s] == q[s].max())
            a = int(ties[int(choice_u * len(ties))])
        d = int(direction_u * 4) if noise_u < noise_prob else a
        if noise == "action":
            a = d
        s2 = moves_by_hand(s, d)
        reward = 5.0 if s2 == GOAL else -1.0
        target = reward if s2 == GOAL else reward + gamma * q[s2].max()
        if residual:
            delta = target - q[s, a]
            for b in range(4):
                values[s, b] += alpha * delta * ((a == b) + k / 4)
        else:
            values[s, a] = values[s, a] + alpha * (target - values[s, a])
        if s2 == GOAL:
            completions.append(t + 1)
            s2 = 0
        s = s2
    final_q = values + k * values.mean(axis=1, keepdims=True) if residual else values
    return completions, final_q


def args(**kw):
    base = dict(runs=3, steps=400, horizons=(100, 250, 400), seed=7)
    return tab.Args(**{**base, **kw})


def counts(completions, horizons):
    """Episodes completed before each horizon, as the authors count them (np.searchsorted)."""
    return [int(np.searchsorted(completions, h)) for h in horizons]


def test_the_gridworld_moves():
    moves = tab.gridworld_moves()
    assert moves.shape == (25, 4)
    assert [[moves_by_hand(s, d) for d in range(4)] for s in range(25)] == moves.tolist()
    assert moves[0].tolist() == [5, 0, 0, 1] and moves[24].tolist() == [24, 19, 23, 24] and moves[4].tolist() == [9, 4, 3, 4]


def test_one_residual_update_against_a_hand_computation():
    row = np.array([[1.0, 2.0, 3.0, 4.0]])
    new = tab.residual_update(row, action=np.array([2]), td_step=np.array([0.5]), me_coef=np.array([2.0]))
    # alpha * delta * ([a == b] + k / |A|) = 0.5 * ([0, 0, 1, 0] + 0.5)
    assert new.tolist() == [[1.25, 2.25, 3.75, 4.25]]
    q_before, q_after = tab.q_values(row, np.array([2.0])), tab.q_values(new, np.array([2.0]))
    assert q_before.tolist() == [[6.0, 7.0, 8.0, 9.0]]  # R + 2 * mean(R) = R + 5
    assert (q_after - q_before).tolist() == [[1.0, 1.0, 1.5, 1.0]]  # alpha delta k elsewhere, alpha delta (1 + k) on a


def test_epsilon_greedy_breaks_ties_at_random_and_explores_uniformly():
    q = np.array([[0.0, 3.0, 3.0, 1.0]] * 4)
    greedy = tab.epsilon_greedy(q, explore_u=np.full(4, 0.5), choice_u=np.array([0.0, 0.49, 0.5, 0.99]), epsilon=0.1)
    assert greedy.tolist() == [1, 1, 2, 2]
    explored = tab.epsilon_greedy(q, explore_u=np.full(4, 0.05), choice_u=np.array([0.0, 0.3, 0.6, 0.9]), epsilon=0.1)
    assert explored.tolist() == [0, 1, 2, 3]


def test_value_iteration_against_a_hand_solved_2x2_grid():
    # states 0 1 / 2 3 (3 the goal): from 1 and 2 one step reaches the goal (+5), from 0 two steps (-1 + 0.95 * 5)
    transitions = tab.transition_matrix(tab.gridworld_moves(2, 2), "direction", noise_prob=0.0)
    assert tab.value_iteration(transitions, 0.95) == pytest.approx([3.75, 5.0, 5.0, 0.0], abs=1e-10)


def test_value_iteration_with_noise_is_the_bellman_fixed_point():
    moves = tab.gridworld_moves()
    v = tab.value_iteration(tab.transition_matrix(moves, "direction", 0.25), 0.95)
    reward = np.where(np.arange(25) == GOAL, 5.0, -1.0)
    for s in range(24):  # by hand: the chosen move with 0.75, each of the 4 directions with 0.0625
        q = [0.75 * (reward[moves[s, a]] + 0.95 * v[moves[s, a]])
             + sum(0.0625 * (reward[moves[s, d]] + 0.95 * v[moves[s, d]]) for d in range(4)) for a in range(4)]
        assert v[s] == pytest.approx(max(q), abs=1e-9)
    assert v[GOAL] == 0.0 and v[23] == pytest.approx(max(q), abs=1e-9) and v[0] < v[18] < v[23]


def test_k0_is_exactly_plain_q_learning():
    result = tab.simulate(args(), [0.0], [0.3])
    for run in range(3):
        completions, q = plain_loop(0.0, 0.3, run, 3, 400, seed=7, residual=False)
        assert len(completions) > 5  # the runs do reach the goal
        assert result.episodes[0, 0, run].tolist() == counts(completions, (100, 250, 400))
        np.testing.assert_array_equal(result.q[0, 0, run], q)  # the same values, bit for bit


@pytest.mark.parametrize("noise", ["direction", "action"])
def test_the_vectorized_sweep_matches_a_plain_loop_with_the_same_draws(noise):
    coefs, step_sizes = [0.0, 1.6, 6.4], [0.05, 0.3]
    result = tab.simulate(args(noise=noise), coefs, step_sizes)
    for ki, k in enumerate(coefs):
        for ai, alpha in enumerate(step_sizes):
            for run in range(3):
                completions, q = plain_loop(k, alpha, run, 3, 400, seed=7, noise=noise)
                assert result.episodes[ki, ai, run].tolist() == counts(completions, (100, 250, 400)), (k, alpha, run)
                np.testing.assert_allclose(result.q[ki, ai, run], q, rtol=1e-12, atol=1e-12)


def test_a_sub_sweep_replays_the_same_runs_as_the_full_one():
    full = tab.simulate(args(), [0.0, 0.8, 3.2], [0.1, 0.5])
    alone = tab.simulate(args(), [3.2], [0.5])
    np.testing.assert_array_equal(full.episodes[2, 1], alone.episodes[0, 0])
    np.testing.assert_array_equal(full.value_error[2, 1], alone.value_error[0, 0])


def test_summary_picks_the_best_step_size_and_drops_diverged_ones():
    a = args(steps=2000, horizons=(500, 2000), me_coefs=(0.0, 12.8), step_sizes=(0.05, 0.2, 1.0), value_error_coefs=(0.0, 12.8))
    result = tab.simulate(a, a.me_coefs, a.step_sizes)
    summary = tab.summarize(a, result)
    by_pair = {(e["k"], e["step_size"]): e for e in summary["sweep"]}
    assert by_pair[(12.8, 1.0)]["diverged_runs"] == 3  # alpha (1 + k) = 13.8 > 2: the values overflow
    assert by_pair[(0.0, 1.0)]["diverged_runs"] == by_pair[(12.8, 0.05)]["diverged_runs"] == 0
    for k in ("0.0", "12.8"):
        for h in ("500", "2000"):
            best = summary["best"][k][h]
            candidates = [e["episodes"][h]["mean"] for (kk, _), e in by_pair.items() if str(kk) == k and not e["diverged_runs"]]
            assert best["mean"] == max(candidates)
    assert all(summary["best"]["12.8"][h]["step_size"] != 1.0 for h in ("500", "2000"))
    b0, b = summary["best"]["0.0"]["2000"], summary["best"]["12.8"]["2000"]
    assert b0["percent_increase"] == 0.0 and b0["percent_increase_ci95_half_width"] is None
    assert b["percent_increase"] == pytest.approx(100 * (b["mean"] - b0["mean"]) / b0["mean"])
    assert len(summary["value_error"]["curves"]["12.8"]["mean"]) == len(summary["value_error"]["steps"]) == 40


TINY = ["--runs", "2", "--steps", "200", "--horizons", "100", "200", "--step-sizes", "0.1", "0.5",
        "--me-coefs", "0", "1"]


def run_script(*flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tabular_meanexp.py"), *flags],
                          capture_output=True, text=True, timeout=120)


def test_a_tiny_run_writes_the_results_and_both_figures(tmp_path):
    out = tmp_path / "tab"
    proc = run_script(*TINY, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "step 200/200" in proc.stdout
    results = json.loads((out / "tabular_results.json").read_text())
    assert set(results["best"]) == {"0.0", "1.0"} and set(results["best"]["1.0"]) == {"100", "200"}
    assert {"step_size", "mean", "se", "percent_increase"} <= set(results["best"]["1.0"]["200"])
    assert len(results["sweep"]) == 4 and results["settings"]["noise"] == "direction"
    assert set(results["value_error"]["curves"]) == {"0.0", "1.0"}  # every swept k where the paper's are not
    for png in ("episodes_increase.png", "value_error.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_script(*TINY, "--out", str(out))  # results already there: refused, nothing overwritten
    assert again.returncode == 2 and "already holds" in again.stderr
    assert json.loads((out / "tabular_results.json").read_text()) == results


@pytest.mark.parametrize("flags, message", [
    (["--me-coefs", "0", "-1"], "--me-coefs must be finite numbers >= 0"),
    (["--me-coefs", "1", "2"], "must include 0"),
    (["--runs", "0"], "--runs must be > 0"),
    (["--horizons", "300"], "--horizons must be in [1, --steps = 200]"),
    (["--step-sizes", "0", "0.5"], "--step-sizes must be in (0, 1]"),
    (["--noise-prob", "1.5"], "--noise-prob must be a probability"),
    (["--noise", "slip"], "noise"),
    (["--value-error-coefs", "0", "3"], "--value-error-coefs [0.0, 3.0] must be among --me-coefs [0.0, 1.0]"),
    (["--seed", "-1"], "--seed must be in [0, 2^63) (got -1)"),  # issue 34: a traceback and an empty --out
    (["--horizons", "100", "100"], "--horizons must not repeat a value (got [100, 100])"),
    (["--value-error-interval", "500"], "--value-error-interval 500 is longer than --steps 200"),
])
def test_bad_flags_are_refused_with_a_clear_message(tmp_path, flags, message):
    proc = run_script(*TINY, *flags, "--out", str(tmp_path / "tab"))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "tab").exists()  # refused before anything was written


def test_an_unwritable_out_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_script(*TINY, "--out", str(blocker / "tab"))
    assert proc.returncode == 2 and "is not a writable directory" in proc.stderr, proc.stderr
    assert blocker.read_text() == "not a directory"
