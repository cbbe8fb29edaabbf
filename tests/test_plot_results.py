"""plot_results.py on synthetic run folders with known values: the numbers, the figures, and what is missing."""

import csv
import glob
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
from matplotlib import image

import plot_results
from conftest import ROOT
from synthetic_runs import DEMO_GAMES, make_demo, write_run

FAST = ["--reps", "300", "--curve-reps", "30", "--curve-points", "5", "--workers", "2"]
GAMES = list(DEMO_GAMES)  # 8 games with their ids and random and human scores


def plot(runs_dir, out_dir, *extra, code=0):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "plot_results.py"), "--runs-dir", str(runs_dir),
                           "--out-dir", str(out_dir), *FAST, *extra], capture_output=True, text=True, timeout=600)
    assert proc.returncode == code, proc.stdout + proc.stderr
    return proc


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def score_of(game, hns):
    """The raw game score whose human-normalized score is hns."""
    _, random_score, human_score = DEMO_GAMES[game]
    return random_score + hns * (human_score - random_score)


def curve(final):
    return [(250_000, final / 2), (500_000, final)]


def aggregate(rows, variant, metric):
    row = next(r for r in rows if (r["variant"], r["metric"]) == (variant, metric))
    return float(row["value"]), float(row["ci_low"]), float(row["ci_high"]), row


def test_scores_are_read_from_the_recorded_settings_and_normalized_exactly(tmp_path):
    runs = tmp_path / "runs"
    # directory names that say something else: only config.json counts
    write_run(runs, "pong_dqn_k0_s1", "iqn", "ALE/Breakout-v5", seed=7, final_mean=30.5, eval_returns=curve(30.5))  # human
    write_run(runs, "pong_dqn_k0_s2", "iqn", "ALE/Breakout-v5", seed=8, final_mean=1.7, eval_returns=curve(1.7))  # random
    write_run(runs, "x", "dqn", "PongNoFrameskip-v4", seed=1, me_coef=0, final_mean=-20.7, eval_returns=curve(-20.7))
    plot(runs, tmp_path / "out")
    rows = {(r["variant"], r["algo"], r["me_coef"], r["game"]): r for r in read_csv(tmp_path / "out" / "per_game.csv")}
    assert set(rows) == {("IB-IQN", "iqn", "|A|", "breakout"), ("DQN", "dqn", "0", "pong")}
    breakout = rows[("IB-IQN", "iqn", "|A|", "breakout")]
    assert (breakout["seeds"], breakout["n_seeds"]) == ("7 8", "2")
    assert float(breakout["mean"]) == pytest.approx(16.1, abs=1e-12) and float(breakout["std"]) == pytest.approx(14.4, abs=1e-12)
    assert float(breakout["human_normalized"]) == pytest.approx(0.5, abs=1e-12)  # (16.1 - 1.7) / (30.5 - 1.7)
    assert float(rows[("DQN", "dqn", "0", "pong")]["human_normalized"]) == 0.0


# human-normalized scores of 8 games x 2 seeds, for a hand computation of the aggregates
HNS = np.array([[0.0, 0.3, 0.5, 0.7, 0.9, 1.2, 2.0, 5.0],
                [0.2, 0.1, 0.6, 0.8, 1.1, 1.4, 3.0, 4.0]])


def write_matrix(runs, algo, k, matrix, seeds=None):
    for s, row in enumerate(matrix):
        seed = (seeds or range(1, len(matrix) + 1))[s]
        for game, hns in zip(GAMES, row):
            final = score_of(game, hns)
            write_run(runs, f"{game}__{algo}__k{k}__s{seed}", algo, DEMO_GAMES[game][0], seed,
                      me_coef=None if k == "A" else float(k), final_mean=final, eval_returns=curve(final))


def test_aggregates_match_a_hand_computation(tmp_path):
    runs = tmp_path / "runs"
    write_matrix(runs, "dqn", "0", HNS)
    write_matrix(runs, "dqn", "A", HNS + 10)  # better on every game and seed
    plot(runs, tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "aggregate.csv")
    values = np.sort(HNS.ravel())
    expected = {
        "iqm": values[4:12].mean(),  # 16 scores: the middle half, without the 4 lowest and the 4 highest
        "median": np.median(HNS.mean(axis=0)),  # median of the per-game means
        "mean": HNS.mean(),
        "optimality_gap": 1 - np.minimum(HNS, 1).mean(),
    }
    assert expected["iqm"] == pytest.approx((0.6 + 0.7 + 0.8 + 0.9 + 1.1 + 1.2 + 1.4 + 0.5) / 8)
    for metric, value in expected.items():
        point, low, high, row = aggregate(rows, "DQN", metric)
        assert point == pytest.approx(value, abs=1e-9), metric
        assert low <= point <= high and (row["games"], row["seeds"]) == ("8", "2")
    point, low, high, row = aggregate(rows, "IB-DQN(k) vs DQN", "probability_of_improvement")
    assert (point, low, high) == (1.0, 1.0, 1.0) and row["games"] == "8"
    assert aggregate(rows, "IB-DQN(k)", "optimality_gap")[0] == pytest.approx(0.0, abs=1e-9)  # all above human


def test_confidence_intervals_contain_the_estimate_and_shrink_with_more_seeds(tmp_path):
    rng = np.random.default_rng(1)
    base = np.linspace(0.2, 3.0, len(GAMES))
    runs = tmp_path / "runs"
    write_matrix(runs, "dqn", "0", base + rng.normal(0, 0.5, (3, len(GAMES))))
    write_matrix(runs, "iqn", "0", base + rng.normal(0, 0.5, (12, len(GAMES))))  # the same spread, 4x the seeds
    plot(runs, tmp_path / "out", "--reps", "2000")
    rows = read_csv(tmp_path / "out" / "aggregate.csv")
    for row in rows:
        assert float(row["ci_low"]) <= float(row["value"]) <= float(row["ci_high"]), row
    for metric in ("iqm", "mean"):
        _, low3, high3, _ = aggregate(rows, "DQN", metric)
        _, low12, high12, _ = aggregate(rows, "IQN", metric)
        assert high12 - low12 < high3 - low3, metric


FIGURES = ["aggregate_iqm.png", "per_game_curves.png", "action_gap.png", "overestimation.png", "normalized_overestimation.png",
           "overestimation_final.png", "relative_change_ib_dqn_k_vs_dqn.png", "relative_change_ib_iqn_vs_iqn.png",
           "k_sensitivity.png", "claims_relative_action_gap_increase_ib_dqn_k_vs_dqn.png",
           "claims_overestimation_decrease_pct_ib_dqn_k_vs_dqn.png", "claims_relative_action_gap_increase_ib_iqn_vs_iqn.png",
           "claims_overestimation_decrease_pct_ib_iqn_vs_iqn.png"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_demo(str(root / "runs"), steps=2_000_000)
    return root


def test_every_figure_is_a_valid_png_embedded_in_the_report(demo, tmp_path):
    plot(demo / "runs", tmp_path / "out")
    report = (tmp_path / "out" / "report.md").read_text()
    for name in FIGURES:
        path = tmp_path / "out" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        pixels = image.imread(path)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400 and pixels.std() > 0.01, name  # drawn, not blank
        assert f"![{name}]({name})" in report
    assert "| IB-DQN(k) | dqn | \\|A\\| | iqm |" in report  # the aggregate table, |A| escaped for Markdown
    assert "Nothing: every variant has every game and seed" not in report  # 49 of the 57 games were never run
    assert "DQN: no run at all for 49 of 57 games" in report


def test_partial_results_are_used_and_every_gap_is_named(demo, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(demo / "runs", runs)
    for seed in (1, 2, 3):
        shutil.rmtree(runs / f"pong__dqn__s{seed}")  # a game never run
    shutil.rmtree(runs / "breakout__ib_iqn__s2")  # a seed missing
    os.remove(runs / "qbert__ib_dqn__s3" / "final_eval.json")  # a run still going
    (runs / "broken").mkdir()
    (runs / "broken" / "config.json").write_text("{ not json")
    stale = runs / "_batch" / "stale" / "seaquest__dqn__s1.20261124-101010"  # an earlier, unfinished try of a run
    shutil.copytree(runs / "seaquest__dqn__s1", stale)
    os.remove(stale / "final_eval.json")
    events = glob.glob(str(runs / "space_invaders__dqn__s2" / "events.out.tfevents.*"))[0]
    with open(events, "r+b") as f:  # a damaged event file: the reader stopped at the damage without a word (issue 34)
        f.seek(os.path.getsize(events) // 2)
        f.write(b"\x00damage\x00" * 4)
    proc = plot(runs, tmp_path / "out")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "- DQN: no run at all for 50 of 57 games: " in report and "pong" in report.split("DQN: no run at all")[1]
    assert "IB-IQN, breakout: no run for seed(s) [2]" in report
    assert "IB-IQN, final-score aggregate: breakout: only 2 of 3 seeds, left out" in report
    assert "IB-DQN(k), qbert, seed 3: unfinished (no final_eval.json" in report and "in the curves, not in the final scores" in report
    assert "IB-DQN(k), final-score aggregate: qbert: only 2 of 3 seeds, left out" in report
    assert f"not read: {runs / 'broken'}: not a readable run" in report
    assert f"left out: {stale}: the same variant, game and seed as {runs / 'seaquest__dqn__s1'}" in report  # not "not read"
    assert "IB-IQN, IQM curve: breakout: only 2 of 3 seeds, left out" in report
    assert (f"{runs / 'space_invaders__dqn__s2'}: its event file {os.path.basename(events)} is damaged (failed event crc32 "
            "check): its curves stop there") in report
    rows = read_csv(tmp_path / "out" / "aggregate.csv")
    assert aggregate(rows, "DQN", "iqm")[3]["games"] == "7"
    assert aggregate(rows, "IB-IQN", "iqm")[3]["games"] == "7"
    assert aggregate(rows, "IB-DQN(k) vs DQN", "probability_of_improvement")[3]["games"] == "6"  # games both have whole
    per_game = read_csv(tmp_path / "out" / "per_game.csv")
    qbert = next(r for r in per_game if (r["variant"], r["game"]) == ("IB-DQN(k)", "qbert"))
    assert qbert["seeds"] == "1 2"  # the finished seeds still count in the per-game table
    seaquest = next(r for r in per_game if (r["variant"], r["game"]) == ("DQN", "seaquest"))
    assert seaquest["seeds"] == "1 2 3"  # the stale copy of seed 1 is not counted twice
    assert proc.stdout.startswith("92 runs in 4 variants")


ROWS = {  # the paper's rows as the scripts record them: (algo, me_coef, settings) -> the name plot_results gives them
    ("dqn", 0, ()): "DQN",
    ("dqn", None, ()): "IB-DQN(k)",
    ("dqn", 1, ()): "IB-DQN(1)",
    ("dqn", 0, (("optimizer", "rmsprop"), ("loss", "huber"))): "DQN (RMSprop, Huber)",
    ("dqn", None, (("optimizer", "rmsprop"), ("loss", "huber"))): "IB-DQN (RMSprop, Huber)",
    ("dqn", None, (("network", "dueling"),)): "Dueling DQN",  # its default k is 0
    ("dqn", None, (("network", "rdq"), ("loss", "mse"))): "RDQ",
    ("iqn", 0, ()): "IQN",
    ("iqn", None, ()): "IB-IQN",
    ("dqn", 2.5, (("loss", "huber"),)): "DQN k=2.5 (huber)",  # not a row of the paper: named by what differs
}


def test_the_papers_rows_are_named_and_compared_with_their_baselines(tmp_path):
    runs = tmp_path / "runs"
    for i, ((algo, k, settings), name) in enumerate(ROWS.items()):
        for game in ("pong", "breakout"):
            for seed in (1, 2):
                final = score_of(game, 0.1 * i + 0.01 * seed)
                write_run(runs, f"{game}_{i}_{seed}", algo, DEMO_GAMES[game][0], seed, me_coef=k, final_mean=final,
                          eval_returns=curve(final), final_overestimation=i + seed / 2, **dict(settings))
    plot(runs, tmp_path / "out")
    per_game = read_csv(tmp_path / "out" / "per_game.csv")
    assert [r["variant"] for r in per_game[::2]] == list(ROWS.values())  # in the paper's order, then the others
    assert {r["me_coef"] for r in per_game if r["variant"] in ("Dueling DQN", "RDQ")} == {"0"}
    rows = read_csv(tmp_path / "out" / "aggregate.csv")
    pairs = [r["variant"] for r in rows if r["metric"] == "probability_of_improvement"]
    assert pairs == ["IB-DQN(k) vs DQN", "IB-DQN(k) vs Dueling DQN", "IB-DQN(k) vs RDQ", "IB-DQN(1) vs DQN",
                     "IB-DQN (RMSprop, Huber) vs DQN (RMSprop, Huber)", "IB-IQN vs IQN"]
    assert aggregate(rows, "IB-DQN(k) vs RDQ", "probability_of_improvement")[0] == 0.0  # RDQ (i = 6) scores higher
    figures = sorted(p.name for p in (tmp_path / "out").glob("relative_change_*.png"))
    assert figures == sorted(f"relative_change_{name}.png" for name in (
        "ib_dqn_k_vs_dqn", "ib_dqn_k_vs_dueling_dqn", "ib_dqn_k_vs_rdq", "ib_dqn_1_vs_dqn",
        "ib_dqn_rmsprop_huber_vs_dqn_rmsprop_huber", "ib_iqn_vs_iqn"))
    # overestimation: each game's mean over seeds i + 0.5 and i + 1 is i + 0.75; normalized is a tenth of it
    over = {(r["variant"], r["statistic"]): r for r in read_csv(tmp_path / "out" / "overestimation.csv")}
    for i, name in enumerate(ROWS.values()):
        assert float(over[(name, "overestimation")]["median_over_games"]) == pytest.approx(i + 0.75)
        assert float(over[(name, "normalized_overestimation")]["mean_over_games"]) == pytest.approx((i + 0.75) / 10)
        assert over[(name, "overestimation")]["games"] == "2"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Overestimation (final evaluation)" in report and "| RDQ | overestimation | 6.750 |" in report


def test_variants_with_no_game_in_common_get_no_probability_of_improvement(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "a", "dqn", "ALE/Breakout-v5", 1, me_coef=0, final_mean=10.0, eval_returns=curve(10.0))
    write_run(runs, "b", "dqn", "ALE/Pong-v5", 1, final_mean=0.0, eval_returns=curve(0.0))
    plot(runs, tmp_path / "out")
    assert "probability_of_improvement" not in (tmp_path / "out" / "aggregate.csv").read_text()
    report = (tmp_path / "out" / "report.md").read_text()
    assert "IB-DQN(k), final-score aggregate: no game finished by both it and DQN: no probability of improvement" in report
    assert "No game has runs at two or more k with the same algorithm" in report  # one k per game: no sweep
    assert not (tmp_path / "out" / "k_sensitivity.png").exists()


def write_k_runs(runs, game, k, curves, **settings):
    """DQN runs of one game at one k (None: the scripts' default, |A| = 18), one per seed, from {seed: the human-normalized
    evaluation scores at steps 250k, 500k, ...}."""
    for seed, hns in curves.items():
        points = [(250_000 * (i + 1), score_of(game, h)) for i, h in enumerate(hns)]
        name = f"{game}__k{k}__s{seed}" + "".join(f"__{value}" for value in settings.values())
        write_run(runs, name, "dqn", DEMO_GAMES[game][0], seed, me_coef=k, eval_returns=points, **settings)


def test_k_sensitivity_is_the_auc_of_the_mean_over_seeds_per_game_and_k(tmp_path):
    runs = tmp_path / "runs"
    write_k_runs(runs, "enduro", 0, {1: [0.5, 1.0, 1.5, 2.0], 2: [0.5, 0.5, 0.5, 0.5]})
    write_k_runs(runs, "enduro", 1, {1: [1.0, 1.0, 1.0, 2.0]})
    write_k_runs(runs, "enduro", 32, {1: [2.0, 4.0, 9.0, 9.0], 2: [0.0, 2.0]})  # seed 2 unfinished: 2 of 4 evaluations
    write_k_runs(runs, "breakout", 0, {1: [0.0, 1.0, 1.0, 2.0], 2: [1.0, 1.0, 1.0, 2.0]})
    write_k_runs(runs, "breakout", None, {3: [2.0, 2.0, 2.0, 2.0]})
    write_k_runs(runs, "pong", 0, {1: [1.0, 1.0, 1.0, 1.0]})  # one k only: left out, and named
    write_k_runs(runs, "enduro", 0, {1: [50.0] * 4}, network="dueling")  # other settings: no part of DQN's sweep
    write_k_runs(runs, "breakout", 0, {1: [50.0] * 4}, optimizer="rmsprop", loss="huber")  # nor this
    plot(runs, tmp_path / "out")
    rows = {(r["game"], r["k"]): r for r in read_csv(tmp_path / "out" / "k_sensitivity.csv")}
    # by hand: the mean over seeds at each step, then the mean over the steps every seed has
    expected = {  # (game, k): (AUC, seeds, evaluation steps used, standard error over seeds of each seed's AUC)
        ("enduro", "0"): ((0.5 + 0.75 + 1.0 + 1.25) / 4, "1 2", 4, 0.375),  # seed AUCs 1.25 and 0.5
        ("enduro", "1"): (1.25, "1", 4, float("nan")),
        ("enduro", "32"): ((1.0 + 3.0) / 2, "1 2", 2, 1.0),  # the first two steps only; seed AUCs 3 and 1
        ("breakout", "0"): ((0.5 + 1.0 + 1.0 + 2.0) / 4, "1 2", 4, 0.125),  # seed AUCs 1 and 1.25
        ("breakout", "|A|"): (2.0, "3", 4, float("nan")),
    }
    assert set(rows) == set(expected)
    for key, (auc, seeds, points, se) in expected.items():
        row = rows[key]
        assert float(row["auc"]) == pytest.approx(auc, abs=1e-6), key  # TensorBoard stores float32 scores
        assert (row["seeds"], row["n_seeds"], row["points"]) == (seeds, str(len(seeds.split())), str(points)), key
        assert float(row["seed_auc_se"]) == pytest.approx(se, abs=1e-6, nan_ok=True), key
        assert (row["algo"], row["network"], row["optimizer"], row["loss"]) == ("dqn", "nature", "adam", "sse")
    assert float(rows[("breakout", "|A|")]["me_coef"]) == 18.0
    assert (rows[("enduro", "32")]["first_step"], rows[("enduro", "32")]["last_step"]) == ("250000", "500000")
    assert rows[("enduro", "32")]["longest_step"] == "1000000"
    path = tmp_path / "out" / "k_sensitivity.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.imread(path).std() > 0.01
    report = (tmp_path / "out" / "report.md").read_text()
    section = report[report.index("## k sensitivity"):report.index("## Figures")]
    assert "### DQN (nature, adam, sse)" in section and "![k_sensitivity.png](k_sensitivity.png)" in report
    assert "| game | k = 0 | k = 1 | k = \\|A\\| | k = 32 |" in section  # k in order of its value, |A| = 18
    assert "| breakout | 1.125 (2 seeds) |  | 2.000 (1 seed) |  |" in section
    assert "| enduro | 0.875 (2 seeds) | 1.250 (1 seed) |  | 2.000 (2 seeds) |" in section
    assert "- DQN (nature, adam, sse), pong: an AUC at k = 0 only: left out" in section
    assert ("- DQN (nature, adam, sse), enduro, k = 32: its seeds reach different steps (the furthest 1,000,000): "
            "the AUC uses the 2 steps all 2 have, 250,000 to 500,000") in section
    assert "- DQN (nature, adam, sse), enduro: its k values rest on different evaluation steps" in section
    assert "dueling" not in section and "rmsprop" not in section  # one k each: no sweep, nothing to say


def test_an_aggregate_uses_the_seed_count_that_uses_the_most_runs():
    def by_game(*counts):
        return {f"g{i}": {seed: float(seed) for seed in range(1, n + 1)} for i, n in enumerate(counts)}

    games, chosen, notes = plot_results.rectangular(by_game(3, 3, 3, 2, 2))  # 5 x 2 = 10 runs beat 3 x 3 = 9
    assert games == ["g0", "g1", "g2", "g3", "g4"] and set(map(tuple, chosen.values())) == {(1, 2)}
    assert notes == [f"g{i}: seeds [3] not used (the others have 2)" for i in range(3)]
    games, chosen, notes = plot_results.rectangular(by_game(3, 3, 3, 3, 2))  # 4 x 3 = 12 beat 5 x 2 = 10
    assert games == ["g0", "g1", "g2", "g3"] and notes == ["g4: only 2 of 3 seeds, left out"]
    games, chosen, notes = plot_results.rectangular(by_game(2, 2, 1, 1))  # 2 x 2 = 4 x 1: the larger count
    assert games == ["g0", "g1"] and chosen == {"g0": [1, 2], "g1": [1, 2]}
    assert plot_results.rectangular({}) == ([], {}, [])


def test_the_minatar_aggregate_normalizes_by_the_seeds_it_uses():
    aucs = {("IB", g): {1: 3.0, 2: 5.0} for g in ("a", "b")}
    aucs.update({("DQN", "a"): {1: 2.0, 2: 2.0, 3: 8.0}, ("DQN", "b"): {1: 1.0, 2: 3.0}})  # a's seed 3: not in the aggregate
    variants = {"IB": [types.SimpleNamespace(baselines=["DQN"])], "DQN": [types.SimpleNamespace(baselines=[])]}
    rows, notes = plot_results.minatar_aggregate(variants, aucs, plot_results.Args(reps=50))
    iqm = {r["variant"]: r for r in rows if r["metric"] == "iqm_normalized_auc"}
    assert (iqm["DQN"]["value"], iqm["DQN"]["seeds"], iqm["DQN"]["games"]) == (1.0, 2, 2)  # 2 / 2 and (1, 3) / 2, not 2 / 4
    assert iqm["IB"]["value"] == pytest.approx(np.mean([1.5, 2.5]))  # the middle half of 1.5, 2.5, 1.5, 2.5 (a's / 2, b's / 2)
    assert notes == ["IB vs DQN, DQN: a: seeds [3] not used (the others have 2)"]


def test_video_pinball_is_normalized_with_the_authors_random_score_unless_told_otherwise(tmp_path):
    import plot_results

    games_csv = plot_results.Args().games_csv
    authors, dqn_zoo = (plot_results.read_games(games_csv, table)[1] for table in ("authors", "dqn_zoo"))
    assert round(float(plot_results.human_normalized(20_000, "video_pinball", authors)), 2) == 1.13  # 20,000 / 17,667.9
    assert round(float(plot_results.human_normalized(20_000, "video_pinball", dqn_zoo)), 2) == 2.65  # 3,743.1 / 1,411
    assert [g for g in authors if authors[g] != dqn_zoo[g]] == ["video_pinball"]  # the one game the tables differ in
    write_run(tmp_path / "runs", "pinball", "dqn", "ALE/VideoPinball-v5", 1, me_coef=0, final_mean=20_000.0,
              eval_returns=curve(20_000.0))
    tables = [((), 0.0, 20_000 / 17_667.9, "the authors' table"),
              (("--score-table", "dqn_zoo"), 16_256.9, 3_743.1 / 1_411, "DQN Zoo's table")]
    for extra, random_score, normalized, named in tables:
        plot(tmp_path / "runs", tmp_path / "out", *extra)
        row = read_csv(tmp_path / "out" / "per_game.csv")[0]
        assert float(row["random_score"]) == random_score and float(row["human_normalized"]) == pytest.approx(normalized)
        assert named in (tmp_path / "out" / "report.md").read_text()


def test_a_games_table_without_the_chosen_random_scores_is_refused(tmp_path):
    write_run(tmp_path / "runs", "a", "dqn", "ALE/Pong-v5", 1, me_coef=0, final_mean=0.0, eval_returns=curve(0.0))
    with open(os.path.join(ROOT, "atari57.csv")) as f:
        lines = f.read().splitlines()
    shared = tmp_path / "shared.csv"  # DQN Zoo's columns only, as ../shared/atari57.csv
    shared.write_text("".join(line.rsplit(",", 1)[0] + "\n" for line in lines))
    proc = plot(tmp_path / "runs", tmp_path / "out", "--games-csv", str(shared), code=2)
    assert "has no column 'authors_random_score' (--score-table authors reads it)" in proc.stderr
    assert not (tmp_path / "out").exists()
    plot(tmp_path / "runs", tmp_path / "out", "--games-csv", str(shared), "--score-table", "dqn_zoo")


@pytest.mark.parametrize("runs_dir,args,message", [
    ("nowhere", [], "--runs-dir 'nowhere' does not exist"),
    ("runs", [], "no run found under 'runs'"),
    ("runs", ["--reps", "0"], "--reps must be >= 1 (got 0)"),
])
def test_bad_input_writes_nothing(tmp_path, runs_dir, args, message):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("no run here")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "plot_results.py"), "--runs-dir", runs_dir,
                           "--out-dir", "out", *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "out").exists()


def test_claims_2_and_3_are_whole_run_means_compared_per_game_as_the_authors_plotting_code_does(tmp_path):
    """plotting/two_alg_aux.py: per run the mean over its evaluation rows; per game the mean over seeds; the gap's
    increase is variant - baseline, the overestimation's % decrease -(variant - baseline) / (|baseline| + 1e-8) x 100.
    A side whose runs predate the statistic is a gap in the report, not a dropped game."""
    runs = tmp_path / "runs"
    rows = {  # (name, me_coef, seed): (relative gaps per evaluation, overestimations per evaluation); binary fractions
        ("dqn", 0, 1): ([0.125, 0.375], [2.0, 4.0]), ("dqn", 0, 2): ([0.5], [5.0]),
        ("ib", None, 1): ([0.5, 0.75], [1.0, 1.0]), ("ib", None, 2): ([1.0], [2.0])}
    for (name, k, seed), (gaps, over) in rows.items():
        steps = [250_000 * (i + 1) for i in range(len(gaps))]
        write_run(runs, f"breakout_{name}_{seed}", "dqn", "ALE/Breakout-v5", seed, me_coef=k, final_mean=10.0,
                  eval_returns=curve(10.0), relative_action_gaps=list(zip(steps, gaps)), overestimations=list(zip(steps, over)))
        # pong: the mean-expansion runs are older than the statistic (no claims/ points)
        write_run(runs, f"pong_{name}_{seed}", "dqn", "ALE/Pong-v5", seed, me_coef=k, final_mean=0.0, eval_returns=curve(0.0),
                  relative_action_gaps=list(zip(steps, gaps)) if name == "dqn" else (), overestimations=list(zip(steps, over)))
    plot(runs, tmp_path / "out")
    claims = {r["game"]: r for r in read_csv(tmp_path / "out" / "claims.csv")}
    breakout = claims["breakout"]
    assert (breakout["variant"], breakout["baseline"]) == ("IB-DQN(k)", "DQN")
    dqn_gap, ib_gap = (0.25 + 0.5) / 2, (0.625 + 1.0) / 2
    assert float(breakout["baseline_relative_action_gap"]) == dqn_gap and float(breakout["variant_relative_action_gap"]) == ib_gap
    assert float(breakout["relative_action_gap_increase"]) == ib_gap - dqn_gap  # unclipped: the authors clip to (-20, 0.01)
    dqn_over, ib_over = (3.0 + 5.0) / 2, (1.0 + 2.0) / 2
    assert float(breakout["overestimation_decrease_pct"]) == -(ib_over - dqn_over) / (abs(dqn_over) + 1e-8) * 100
    assert breakout["variant_relative_action_gap_runs"] == "2" and breakout["baseline_overestimation_runs"] == "2"
    # the 95% bootstrap interval over seeds: each side's 2 runs resampled; the extremes (both draws of one run, 1 in 16
    # resamples a side, far above 2.5%) bound it: the gap's increase from 0.625 - 0.5 to 1.0 - 0.25
    interval = [float(breakout[f"relative_action_gap_increase_ci_{end}"]) for end in ("low", "high")]
    assert interval == [0.125, 0.75]
    interval = [float(breakout[f"overestimation_decrease_pct_ci_{end}"]) for end in ("low", "high")]
    assert interval == pytest.approx([-(2.0 - 3.0) / (3.0 + 1e-8) * 100, -(1.0 - 5.0) / (5.0 + 1e-8) * 100], rel=1e-12)
    pong = claims["pong"]
    assert pong["variant_relative_action_gap"] == "" and pong["relative_action_gap_increase"] == ""
    assert pong["relative_action_gap_increase_ci_low"] == "" and pong["overestimation_decrease_pct_ci_low"] != ""
    assert float(pong["baseline_relative_action_gap"]) == dqn_gap and pong["overestimation_decrease_pct"] != ""
    report = (tmp_path / "out" / "report.md").read_text()
    section = report.split("## Claims 2 and 3")[1].split("\n## ")[0]
    assert "relative action gap larger on 1 of 1 games" in section and "overestimation smaller on 2 of 2 games" in section
    assert "| pong | missing | 0.375 | missing |" in section
    assert "IB-DQN(k), pong, seed 1: no relative action gap" in report and f"({runs / 'pong_ib_1'})" in report
    for name in ("claims_relative_action_gap_increase_ib_dqn_k_vs_dqn.png", "claims_overestimation_decrease_pct_ib_dqn_k_vs_dqn.png"):
        assert f"![{name}]({name})" in report and (tmp_path / "out" / name).exists()


def test_a_file_as_out_dir_is_refused_first_and_a_final_eval_without_mean_is_named(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "good", "dqn", "ALE/Breakout-v5", 1, me_coef=0, final_mean=10.0, eval_returns=curve(10.0))
    bad = write_run(runs, "bad", "dqn", "ALE/Breakout-v5", 2, me_coef=0, final_mean=10.0, eval_returns=curve(10.0))
    with open(os.path.join(bad, "final_eval.json"), "w") as f:
        f.write('{"scores": [1.0]}')  # no mean: a KeyError without a name once (issue 34)
    (tmp_path / "a_file").write_text("")
    refused = plot(runs, tmp_path / "a_file", code=2)
    assert "--out-dir" in refused.stderr and "is not a folder this user can write into" in refused.stderr
    done = plot(runs, tmp_path / "out")
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"not read: {bad}: not a readable run (KeyError: 'mean')" in report, done.stdout


def test_the_default_out_dir_is_not_a_committed_folder():
    """Issue 34: the default --out-dir results wrote beside the committed results/lunar_sweep. The default folder holds no
    committed file, and git ignores it."""
    out_dir = plot_results.Args().out_dir
    tracked = subprocess.run(["git", "ls-files", out_dir], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode:
        pytest.skip("not a git checkout")
    assert tracked.stdout == "" and not out_dir.startswith("results")
    ignored = subprocess.run(["git", "check-ignore", "-q", os.path.join(out_dir, "report.md")], cwd=ROOT)
    assert ignored.returncode == 0, f"git does not ignore {out_dir}/"


def test_one_run_is_counted_in_the_singular(tmp_path):
    write_run(tmp_path / "runs", "pong__dqn__s1", "dqn", "ALE/Pong-v5", 1, me_coef=0, final_mean=-20.0,
              eval_returns=[(250_000, -21.0), (500_000, -20.0)])
    proc = plot(tmp_path / "runs", tmp_path / "out")
    assert proc.stdout.startswith("1 run in 1 variant -> "), proc.stdout  # issue 34: "1 runs"


# ---------------------------------------------------------------------------
# MinAtar: raw-score AUCs per game, the baseline-normalized AUC across games
# ---------------------------------------------------------------------------

MINATAR = {"minatar_breakout": "MinAtar/Breakout-v1", "minatar_freeway": "MinAtar/Freeway-v1"}


def write_minatar_batch(runs):
    """2 games x DQN (k = 0) / IB-DQN(k) x 4 seeds; evaluation scores at 250k, 500k, 750k (seed 4 of IB-DQN(k) on
    freeway unfinished at 500k); relative gaps and overestimations per evaluation. Binary fractions: exact sums."""
    aucs = {}
    for game, env_id in MINATAR.items():
        for name, k in (("dqn", 0), ("ib", None)):
            for seed in range(1, 5):
                base = {"minatar_breakout": 4.0, "minatar_freeway": 32.0}[game] * (1.5 if name == "ib" else 1.0)
                scores = [base + seed, base + 2 * seed, base + 4 * seed]
                finished = not (game == "minatar_freeway" and name == "ib" and seed == 4)
                if not finished:
                    scores = scores[:2]
                steps = [250_000 * (i + 1) for i in range(len(scores))]
                write_run(runs, f"{game}__{name}__s{seed}", "dqn", env_id, seed, me_coef=k,
                          final_mean=scores[-1] + 0.5 if finished else None, eval_returns=list(zip(steps, scores)),
                          relative_action_gaps=[(s, 0.25 * (name == "ib") + 0.125) for s in steps],
                          overestimations=[(s, 2.0 if name == "ib" else 4.0) for s in steps],
                          machine="Test CPU, 2 cores", command=f"dqn_minatar_meanexp.py --seed {seed}")
                aucs[(name, game, seed)] = scores
    return aucs


def test_minatar_aucs_intervals_and_the_normalized_iqm_equal_a_hand_computation(tmp_path):
    from scipy import stats

    scores = write_minatar_batch(tmp_path / "runs")
    proc = plot(tmp_path / "runs", tmp_path / "out")
    assert "16 runs in 2 variants" in proc.stdout
    rows = {(r["variant"], r["game"]): r for r in read_csv(tmp_path / "out" / "minatar_per_game.csv")}
    seed_aucs = {}
    for (name, variant) in (("dqn", "DQN"), ("ib", "IB-DQN(k)")):
        for game in MINATAR:
            # the AUC of each seed: the mean over the steps all 4 seeds have (IB-DQN(k) on freeway: 250k and 500k only)
            points = 2 if (name, game) == ("ib", "minatar_freeway") else 3
            aucs = np.array([np.mean(scores[(name, game, s)][:points]) for s in range(1, 5)])
            seed_aucs[(variant, game)] = aucs
            row = rows[(variant, game)]
            assert float(row["auc"]) == pytest.approx(aucs.mean(), rel=1e-12)
            assert float(row["auc_ci"]) == pytest.approx(1.959963984540054 * aucs.std(ddof=1) / 2, rel=1e-12)
            assert (row["n_seeds"], row["points"], row["last_step"]) == ("4", str(points), str(250_000 * points))
            finals = [scores[(name, game, s)][-1] + 0.5 for s in range(1, 5) if (name, game, s) != ("ib", "minatar_freeway", 4)]
            assert float(row["final_mean"]) == pytest.approx(np.mean(finals)) and row["finished"] == str(len(finals))
    table = read_csv(tmp_path / "out" / "minatar_aggregate.csv")
    for variant in ("IB-DQN(k)", "DQN"):
        # each seed's AUC / the baseline's mean AUC on its game; the IQM of the 4 x 2 values: the mean of the middle 4
        normalized = np.concatenate([seed_aucs[(variant, g)] / seed_aucs[("DQN", g)].mean() for g in MINATAR])
        value, low, high, row = aggregate(table, variant, "iqm_normalized_auc")
        assert value == pytest.approx(stats.trim_mean(normalized, 0.25), rel=1e-12)
        assert low <= value <= high and row["comparison"] == "IB-DQN(k) vs DQN" and (row["games"], row["seeds"]) == ("2", "4")
    value, *_ = aggregate(table, "IB-DQN(k)", "probability_of_improvement")
    wins = [np.mean([(a > b) + 0.5 * (a == b) for a in seed_aucs[("IB-DQN(k)", g)] for b in seed_aucs[("DQN", g)]]) for g in MINATAR]
    assert value == pytest.approx(np.mean(wins), rel=1e-12)  # P(a seed of IB-DQN(k) beats one of DQN), averaged over games
    plot(tmp_path / "runs", tmp_path / "again")  # the bootstrap is seeded (--seed): the same intervals every time
    assert read_csv(tmp_path / "again" / "minatar_aggregate.csv") == table
    claims = {r["game"]: r for r in read_csv(tmp_path / "out" / "minatar_claims.csv")}
    assert float(claims["minatar_breakout"]["relative_action_gap_increase"]) == 0.25
    assert float(claims["minatar_freeway"]["overestimation_decrease_pct"]) == pytest.approx(50.0)
    assert float(claims["minatar_breakout"]["relative_action_gap_increase_ci_low"]) == 0.25  # equal seeds: no spread
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## MinAtar" in report and "## Aggregate human-normalized" not in report  # no human scores on MinAtar
    assert "### Claims 2 and 3 on MinAtar" in report and "#### IB-DQN(k) vs DQN" in report
    assert "IB-DQN(k), minatar_freeway, seed 4: unfinished" in report
    # the summary the README copies: both sides' AUC with their intervals and the claim numbers, per game
    cell = {key: f"{a.mean():.1f} ± {1.959963984540054 * a.std(ddof=1) / 2:.1f} (4 seeds)" for key, a in seed_aucs.items()}
    assert (f"| minatar_breakout | {cell[('DQN', 'minatar_breakout')]} | {cell[('IB-DQN(k)', 'minatar_breakout')]} | "
            "+0.2500 (+0.2500 to +0.2500) | 50 (50 to 50) |") in report  # every seed has the same claim numbers
    assert "| game | AUC, DQN (k = 0) | AUC, IB-DQN(k) (k = \\|A\\|) | relative action gap increase |" in report
    value, low, high, _ = aggregate(table, "IB-DQN(k)", "iqm_normalized_auc")
    assert f"over 2 games, 4 seeds each: IB-DQN(k) {value:.2f} (95% interval {low:.2f} to {high:.2f}), DQN 1.00 (95% interval" in report
    assert ("IB-DQN(k) against DQN: relative action gap larger on 2 of 2 games, its interval above 0 on 2 and below 0 on 0 "
            "of the 2 with one; overestimation smaller on 2 of 2 games, its interval above 0 on 2") in report
    for name in ("minatar_curves.png", "minatar_aggregate.png", "minatar_claims_relative_action_gap_increase_ib_dqn_k_vs_dqn.png"):
        assert f"![{name}]({name})" in report and image.imread(str(tmp_path / "out" / name)).size > 0


def test_records_of_finished_runs_reproduce_the_tables_and_name_their_machine(tmp_path):
    write_minatar_batch(tmp_path / "runs")
    write_run(tmp_path / "runs", "breakout__dqn__s1", "dqn", "ALE/Breakout-v5", 1, me_coef=0, final_mean=score_of("breakout", 0.5),
              eval_returns=curve(score_of("breakout", 0.5)))
    proc = plot(tmp_path / "runs", tmp_path / "out", "--records-dir", str(tmp_path / "records"))
    assert "16 new records in" in proc.stdout  # 15 finished MinAtar runs and the Atari one; the unfinished one is not kept
    records = sorted(os.listdir(tmp_path / "records"))
    assert "minatar_freeway__ib__s4" not in records and len(records) == 17  # and _parts
    assert sorted(os.listdir(tmp_path / "records" / "minatar_breakout__dqn__s1")) == ["config.json", "curves.json",
                                                                                     "final_eval.json"]
    (part,) = glob.glob(str(tmp_path / "records" / "_parts" / "*.json"))
    with open(part) as f:
        part = __import__("json").load(f)
    assert part["machines"] == ["Test CPU, 2 cores", "not recorded"]
    assert part["runs"]["minatar_breakout__dqn__s2"]["command"] == "dqn_minatar_meanexp.py --seed 2"
    again = plot(tmp_path / "runs", tmp_path / "out2", "--records-dir", str(tmp_path / "records"))
    assert "0 new records in" in again.stdout and len(glob.glob(str(tmp_path / "records" / "_parts" / "*.json"))) == 1
    shutil.rmtree(tmp_path / "runs" / "minatar_freeway__ib__s4")  # what the records hold: the finished runs
    plot(tmp_path / "runs", tmp_path / "from_runs")
    plot(tmp_path / "records", tmp_path / "from_records")
    for table in ("minatar_per_game.csv", "minatar_aggregate.csv", "minatar_claims.csv", "per_game.csv", "aggregate.csv"):
        assert read_csv(tmp_path / "from_records" / table) == read_csv(tmp_path / "from_runs" / table), table
    report = (tmp_path / "from_records" / "report.md").read_text()
    assert "## MinAtar" in report and "## Aggregate human-normalized scores" in report  # both suites, each its own tables


def summary_block(report: str) -> list:
    """A report's MinAtar summary as its paragraphs: each comparison's table, then its aggregate line."""
    block = report.split("### Summary\n", 1)[1].split("\nAUC: per seed", 1)[0]
    return [part.strip("\n") for part in block.split("\n\n") if part.strip()]


def test_the_committed_minatar_results_are_their_records_and_the_readme_copies_them_unchanged(tmp_path):
    """docs/minatar is what plot_results.py makes of the records in results/minatar, and the README and docs/minatar.md
    carry its summary (per game both AUCs and the claim numbers, the aggregate) word for word: numbers never retyped."""
    records, committed = os.path.join(ROOT, "results", "minatar"), os.path.join(ROOT, "docs", "minatar")
    plot(records, tmp_path / "out", "--reps", "2000")  # the committed intervals' resamples (the default), not FAST's
    for table in ("minatar_per_game.csv", "minatar_aggregate.csv", "minatar_claims.csv"):
        made, kept = read_csv(tmp_path / "out" / table), read_csv(os.path.join(committed, table))
        assert [list(r) for r in made] == [list(r) for r in kept] and len(made) == len(kept), table
        for new, old in zip(made, kept):
            for column, value in old.items():  # floats to 1e-9: a sum's order may differ on another CPU's SIMD
                try:
                    assert float(new[column]) == pytest.approx(float(value), rel=1e-9, nan_ok=True), (table, column)
                except ValueError:
                    assert new[column] == value, (table, column)
    with open(os.path.join(committed, "report.md")) as f:
        summary = summary_block(f.read())
    assert summary == summary_block((tmp_path / "out" / "report.md").read_text())
    assert len(summary) == 4 and len(summary[1].splitlines()) == 2 + 5  # legend, table (header, rule, 5 games), aggregate, counts
    for page in ("README.md", os.path.join("docs", "minatar.md")):
        with open(os.path.join(ROOT, page)) as f:
            text = f.read()
        assert [part for part in summary if f"\n{part}\n" not in text] == [], page


def prose_after(text: str, start: str) -> str:
    """The paragraphs of a page from the one that opens with `start` to the next heading."""
    return text.split(start, 1)[1].split("\n## ", 1)[0]


def test_the_minatar_prose_takes_every_number_from_the_summary_or_from_students_t():
    """The README's and docs/minatar.md's reading of the results retypes no number: each decimal and percentage in it is
    one the committed summary prints, and 'N times wider than Student's t' is t's 97.5% quantile over 1.96."""
    from scipy import stats

    with open(os.path.join(ROOT, "docs", "minatar", "report.md")) as f:
        summary = "\n".join(summary_block(f.read()))
    printed = set(re.findall(r"\d+\.\d+|\d+", summary))
    # 2 to 5 seeds a game, the campaign's
    t_ratio = {f"{stats.t.ppf(0.975, seeds - 1) / 1.96:.1f}" for seeds in range(2, 6)}
    for page, start in (("README.md", "What this shows."), (os.path.join("docs", "minatar.md"), "What this says")):
        with open(os.path.join(ROOT, page)) as f:
            prose = prose_after(f.read(), start)
        decimals = re.findall(r"(?<![\d.])\d+\.\d+", prose)
        percents = re.findall(r"(\d+)%", prose)
        assert decimals, page  # the reading gives the aggregate's numbers
        assert [n for n in decimals + percents if n not in printed | t_ratio] == [], page
    with open(os.path.join(ROOT, "docs", "minatar.md")) as f:
        widths = re.search(r"Student's t would be (\d+\.\d) times wider at 2 seeds,\s+(\d+\.\d) at 3 and (\d+\.\d) at 5",
                           f.read())
    assert widths and list(widths.groups()) == [f"{stats.t.ppf(0.975, n - 1) / 1.96:.1f}" for n in (2, 3, 5)]
