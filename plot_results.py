"""From a folder of runs to the paper's tables and figures.

    python plot_results.py --runs-dir runs --out-dir results

Reads every run directory that dqn_atari_meanexp.py or iqn_atari_meanexp.py wrote (config.json,
final_eval.json and the TensorBoard events) and writes to --out-dir:

- per_game.csv: the final evaluation score of each algorithm, k and game over its seeds, and its
  human-normalized score (0 = random play, 1 = human, from atari57.csv);
- aggregate.csv: IQM, median, mean and optimality gap of human-normalized scores with 95%
  stratified bootstrap confidence intervals, and the probability that mean-expansion improves on
  the baseline (Agarwal et al. 2021, computed with their rliable package);
- figures: aggregate IQM vs steps, per-game learning curves, action gap and overestimation vs
  steps, and per game the relative change of mean-expansion over the baseline;
- report.md: all of it, with how many games and seeds each number rests on and what is missing.

Algorithm, game, k and seed come from each run's recorded settings (config.json), never from its
directory name. Partial results (missing games or seeds, unfinished runs) are used where they can
be and listed in report.md; nothing is dropped without being named there.
"""

import collections
import csv
import datetime
import glob
import json
import multiprocessing
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402
from rliable import library as rly  # noqa: E402
from rliable import metrics  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# rliable hands arch a numpy RandomState, which arch 7 deprecates; the bootstrap is the same
warnings.filterwarnings("ignore", message="random_state is deprecated", category=FutureWarning)


@dataclass
class Args:
    runs_dir: str = "runs"
    """the folder holding the run directories (as run_all.sh and the scripts write them)"""
    out_dir: str = "results"
    """where the tables, figures and report.md are written (created if needed; these files are replaced)"""
    games_csv: str = os.path.join(HERE, "atari57.csv")
    """the games with their ids and their random and human scores"""
    reps: int = 2000
    """bootstrap resamples for each confidence interval of the final scores"""
    curve_reps: int = 500
    """bootstrap resamples for each point of the aggregate learning curves"""
    curve_points: int = 40
    """at most this many points (evaluation steps) on each aggregate learning curve"""
    seed: int = 0
    """seed of the bootstrap"""
    workers: int = max(1, min(8, os.cpu_count() or 1))
    """processes reading runs in parallel (a 50M-step run's events take several seconds to read)"""


AGGREGATES = {  # rliable's estimators on a (seeds x games) matrix of human-normalized scores
    "iqm": metrics.aggregate_iqm,
    "median": metrics.aggregate_median,
    "mean": metrics.aggregate_mean,
    "optimality_gap": metrics.aggregate_optimality_gap,
}
CURVE_TAGS = ("eval/episodic_return", "eval/overestimation", "metrics/action_gap")


# ---------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------


@dataclass
class Run:
    path: str
    algo: str
    env_id: str
    k: str  # "0", "1.5", ... or "|A|" (the scripts' default, the number of actions)
    seed: int
    eval_interval: int
    final: Optional[dict]  # final_eval.json, None while the run is unfinished
    curves: dict  # tag -> (steps, values) arrays
    last_step: int
    game: str = ""  # from env_id, through atari57.csv

    @property
    def variant(self) -> tuple:
        return self.algo, self.k


def read_run(path: str):
    """A Run, or a string saying why path is not a readable run."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        k = "|A|" if config.get("me_coef_default") else f"{float(config['me_coef']):g}"
        final = None
        if os.path.exists(os.path.join(path, "final_eval.json")):
            with open(os.path.join(path, "final_eval.json")) as f:
                final = json.load(f)
        accumulator = EventAccumulator(path, size_guidance={"scalars": 0})  # applies the purges of resumed runs
        accumulator.Reload()
        tags = set(accumulator.Tags()["scalars"])
        curves = {}
        for tag in CURVE_TAGS:
            points = accumulator.Scalars(tag) if tag in tags else []
            curves[tag] = (np.array([p.step for p in points], dtype=np.int64), np.array([p.value for p in points]))
        last_step = max([int(accumulator.Scalars(t)[-1].step) for t in tags] + [0])
        return Run(path, config["algo"], config["env_id"], k, int(config["seed"]), int(config.get("eval_interval", 0)),
                   final, curves, max(last_step, final["total_steps"] if final else 0))
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{path}: not a readable run ({type(error).__name__}: {error})"


def find_runs(runs_dir: str, workers: int):
    """Every directory under runs_dir with a config.json, read in parallel: (runs, problems)."""
    paths = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(runs_dir, "**", "config.json"), recursive=True))
    with multiprocessing.Pool(workers) as pool:
        results = pool.map(read_run, paths) if workers > 1 else list(map(read_run, paths))
    return [r for r in results if isinstance(r, Run)], [r for r in results if isinstance(r, str)]


def read_games(games_csv: str):
    """{env id: game} for both id columns, and {game: (random score, human score)}."""
    ids, scores = {}, {}
    with open(games_csv) as f:
        for row in csv.DictReader(f):
            for column in ("ale_v5_id", "noframeskip_v4_id"):
                if row[column]:
                    ids[row[column]] = row["game"]
            scores[row["game"]] = (float(row["random_score"]), float(row["human_score"]))
    return ids, scores


# ---------------------------------------------------------------------------
# Scores: human-normalized, arranged as rliable wants them (seeds x games)
# ---------------------------------------------------------------------------


def human_normalized(score, game: str, game_scores: dict):
    random_score, human_score = game_scores[game]
    return (np.asarray(score, dtype=float) - random_score) / (human_score - random_score)


def label(variant: tuple) -> str:
    return f"{variant[0].upper()} k={variant[1]}"


def rectangular(by_game: dict):
    """rliable needs the same number of seeds S for every game. S is the most common count (the larger
    on a tie); games with fewer seeds are left out, games with more use their S lowest seeds.
    by_game: {game: {seed: value}}. Returns (games, seeds per game, what was left out, as sentences)."""
    counts = collections.Counter(len(seeds) for seeds in by_game.values())
    if not counts:
        return [], {}, []
    s = max(counts, key=lambda n: (counts[n], n))
    games = sorted(g for g, seeds in by_game.items() if len(seeds) >= s)
    chosen = {g: sorted(by_game[g])[:s] for g in games}
    notes = [f"{g}: only {len(seeds)} of {s} seeds, left out" for g, seeds in sorted(by_game.items()) if len(seeds) < s]
    notes += [f"{g}: seeds {sorted(by_game[g])[s:]} not used (the others have {s})" for g in games if len(by_game[g]) > s]
    return games, chosen, notes


def to_matrix(by_game: dict, games: list, chosen: dict, value=lambda game, v: v) -> np.ndarray:
    """(seeds x games): row i holds value(game, v) of each game's i-th chosen seed."""
    return np.array([[value(g, by_game[g][chosen[g][i]]) for g in games] for i in range(len(chosen[games[0]]))])


def final_matrix(runs: list, game_scores: dict):
    """(seeds x games) human-normalized final scores of one variant's finished runs, with its games and notes."""
    by_game = collections.defaultdict(dict)
    for run in runs:
        if run.final is not None:
            by_game[run.game][run.seed] = float(human_normalized(run.final["mean"], run.game, game_scores))
    games, chosen, notes = rectangular(by_game)
    matrix = to_matrix(by_game, games, chosen) if games else np.zeros((0, 0))
    return matrix, games, notes


def aggregate_rows(variants: dict, game_scores: dict, args: Args):
    """aggregate.csv's rows: the four aggregates per variant, and the probability of improvement over k=0."""
    rows, matrices, notes = [], {}, {}
    for variant, runs in sorted(variants.items()):
        matrix, games, notes[variant] = final_matrix(runs, game_scores)
        if matrix.size == 0:
            continue
        matrices[variant] = (matrix, games)
        point, interval = rly.get_interval_estimates(
            {"x": matrix}, lambda m: np.array([f(m) for f in AGGREGATES.values()]), reps=args.reps,
            random_state=np.random.RandomState(args.seed))
        for i, metric in enumerate(AGGREGATES):
            rows.append(dict(algo=variant[0], me_coef=variant[1], metric=metric, value=float(point["x"][i]),
                             ci_low=float(interval["x"][0, i]), ci_high=float(interval["x"][1, i]), games=len(games),
                             seeds=matrix.shape[0]))
    for variant, (matrix, games) in sorted(matrices.items()):
        baseline = (variant[0], "0")
        if variant[1] == "0" or baseline not in matrices:
            continue
        base_matrix, base_games = matrices[baseline]
        common = [g for g in games if g in base_games]  # the probability compares the two on the same games
        if not common:
            notes[variant].append(f"no game finished by both it and {label(baseline)}: no probability of improvement")
            continue
        x = matrix[:, [games.index(g) for g in common]]
        y = base_matrix[:, [base_games.index(g) for g in common]]
        point, interval = rly.get_interval_estimates({"x": [x, y]}, metrics.probability_of_improvement, reps=args.reps,
                                                     random_state=np.random.RandomState(args.seed))
        rows.append(dict(algo=variant[0], me_coef=f"{variant[1]} vs 0", metric="probability_of_improvement",
                         value=float(point["x"]), ci_low=float(interval["x"][0, 0]), ci_high=float(interval["x"][1, 0]), games=len(common),
                         seeds=f"{x.shape[0]} vs {y.shape[0]}"))
    return rows, notes


def per_game_rows(variants: dict, game_scores: dict):
    rows = []
    for variant, runs in sorted(variants.items()):
        by_game = collections.defaultdict(list)
        for run in runs:
            if run.final is not None:
                by_game[run.game].append(run)
        for game, game_runs in sorted(by_game.items()):
            game_runs.sort(key=lambda r: r.seed)
            scores = np.array([r.final["mean"] for r in game_runs])
            random_score, human_score = game_scores[game]
            rows.append(dict(algo=variant[0], me_coef=variant[1], game=game, seeds=" ".join(str(r.seed) for r in game_runs),
                             n_seeds=len(game_runs), mean=scores.mean(), std=scores.std(),
                             human_normalized=float(human_normalized(scores.mean(), game, game_scores)),
                             random_score=random_score, human_score=human_score))
    return rows


# ---------------------------------------------------------------------------
# Curves over steps
# ---------------------------------------------------------------------------


def eval_points(run: Run, tag: str) -> dict:
    """{step: value} of an evaluation tag, the step rounded down to its evaluation interval: with several envs
    an evaluation falls a few steps after the multiple it is due at."""
    steps, values = run.curves[tag]
    interval = run.eval_interval or 1
    return {int(s) // interval * interval: v for s, v in zip(steps, values)}


def aggregate_curve(runs: list, game_scores: dict, args: Args):
    """IQM of human-normalized evaluation scores vs steps with 95% CIs, over the steps every run used has reached.
    Returns ((steps, iqm, low, high, a sentence on what the curve rests on) or None, what was left out as sentences)."""
    by_game = collections.defaultdict(dict)
    for run in runs:
        points = eval_points(run, "eval/episodic_return")
        if points:
            by_game[run.game][run.seed] = points
    games, chosen, notes = rectangular(by_game)
    if not games:
        return None, notes + ["no evaluation point in any run: no curve"]
    used = [by_game[g][s] for g in games for s in chosen[g]]
    common = sorted(set.intersection(*(set(p) for p in used)))
    if not common:
        return None, notes + ["its runs share no evaluation step (different --eval-interval?): no curve"]
    steps = [common[int(i)] for i in np.unique(np.linspace(0, len(common) - 1, args.curve_points).round())]
    iqm, low, high = [], [], []
    for step in steps:
        matrix = to_matrix(by_game, games, chosen, lambda g, points: human_normalized(points[step], g, game_scores))
        point, interval = rly.get_interval_estimates({"x": matrix}, metrics.aggregate_iqm, reps=args.curve_reps,
                                                     random_state=np.random.RandomState(args.seed))
        iqm.append(float(point["x"]))
        low.append(float(interval["x"][0, 0]))
        high.append(float(interval["x"][1, 0]))
    note = f"{len(games)} games x {len(chosen[games[0]])} seeds, up to step {steps[-1]:,}, the last every run used has reached"
    return (np.array(steps), np.array(iqm), np.array(low), np.array(high), note), notes


def binned(steps, values, edges):
    """The mean of values in each bin of steps (NaN for an empty bin)."""
    index = np.digitize(steps, edges) - 1
    sums = np.bincount(index, weights=values, minlength=len(edges))[: len(edges) - 1]
    counts = np.bincount(index, minlength=len(edges))[: len(edges) - 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def across_games(runs: list, tag: str, edges):
    """Per game the mean over seeds of the binned tag; returns (median over games, 25th and 75th percentiles)."""
    by_game = collections.defaultdict(list)
    for run in runs:
        steps, values = run.curves[tag]
        if len(steps):
            by_game[run.game].append(binned(steps, values, edges))
    if not by_game:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a bin no run reached: NaN
        per_game = np.array([np.nanmean(np.array(curves), axis=0) for curves in by_game.values()])
        return np.nanmedian(per_game, axis=0), np.nanpercentile(per_game, 25, axis=0), np.nanpercentile(per_game, 75, axis=0)


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------

COLORS = {"0": "tab:gray", "|A|": "tab:red"}  # the baseline grey, the paper's k = |A| red
OTHER_COLORS = ["tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink"]  # other k, in order met


def color(variant: tuple) -> str:
    if variant[1] not in COLORS:
        COLORS[variant[1]] = OTHER_COLORS[(len(COLORS) - 2) % len(OTHER_COLORS)]
    return COLORS[variant[1]]


LINESTYLES = {"dqn": "-", "iqn": "--"}


def by_algo(variants: dict) -> dict:
    algos = collections.defaultdict(dict)
    for variant, runs in sorted(variants.items()):
        algos[variant[0]][variant] = runs
    return algos


def save(fig, path: str):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_aggregate(curves: dict, path: str):
    algos = sorted({v[0] for v in curves})
    fig, axes = plt.subplots(1, len(algos), figsize=(5.5 * len(algos), 4), squeeze=False)
    for ax, algo in zip(axes[0], algos):
        for variant, (steps, iqm, low, high, _) in sorted(curves.items()):
            if variant[0] == algo:
                ax.plot(steps / 1e6, iqm, color=color(variant), label=label(variant))
                ax.fill_between(steps / 1e6, low, high, color=color(variant), alpha=0.25)
        ax.set(title=f"{algo.upper()}: IQM human-normalized score (95% CI)", xlabel="agent steps (millions)",
               ylabel="IQM human-normalized score")
        ax.legend()
    save(fig, path)


def plot_per_game(variants: dict, path: str):
    games = sorted({r.game for runs in variants.values() for r in runs})
    cols = min(8, len(games))
    rows = -(-len(games) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows + 0.7), squeeze=False)
    for ax, game in zip(axes.flat, games):
        for variant, runs in sorted(variants.items()):
            curves = [eval_points(r, "eval/episodic_return") for r in runs if r.game == game]
            curves = [c for c in curves if c]
            if not curves:
                continue
            steps = sorted(set().union(*curves))
            table = np.array([[c.get(s, np.nan) for s in steps] for c in curves])
            x = np.array(steps) / 1e6
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a step only some seeds reached
                ax.plot(x, np.nanmean(table, axis=0), color=color(variant), ls=LINESTYLES.get(variant[0], ":"), lw=1,
                        label=label(variant))
                ax.fill_between(x, np.nanmin(table, axis=0), np.nanmax(table, axis=0), color=color(variant), alpha=0.2)
        ax.set_title(game, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(games):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle("Evaluation score vs agent steps (millions): mean over seeds, band from lowest to highest seed", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / fig.get_figheight()))  # room for the title and legend above the grid
    fig.legend(handles, labels, loc="upper right", fontsize=7, ncol=len(labels))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_across_games(variants: dict, tag: str, title: str, path: str):
    algos = by_algo(variants)
    top = max([r.last_step for runs in variants.values() for r in runs] + [1])
    edges = np.linspace(0, top, 41)
    centers = (edges[:-1] + edges[1:]) / 2 / 1e6
    fig, axes = plt.subplots(1, len(algos), figsize=(5.5 * len(algos), 4), squeeze=False)
    for ax, (algo, algo_variants) in zip(axes[0], sorted(algos.items())):
        for variant, runs in algo_variants.items():
            curve = across_games(runs, tag, edges)
            if curve is not None:
                ax.plot(centers, curve[0], color=color(variant), label=label(variant))
                ax.fill_between(centers, curve[1], curve[2], color=color(variant), alpha=0.2)
        ax.set(title=algo.upper(), xlabel="agent steps (millions)", ylabel=title)
        ax.legend()
    fig.suptitle(f"{title}: median over games of the mean over seeds; band: 25th to 75th percentile over games", fontsize=9)
    save(fig, path)


def relative_change(me: float, base: float, random_score: float, human_score: float) -> float:
    """Percent change of mean-expansion over the baseline, normalized as in the dueling-network paper
    (Wang et al. 2016): 100 (me - base) / (max(human, base) - random)."""
    return 100.0 * (me - base) / (max(human_score, base) - random_score)


def plot_relative_change(changes: dict, variant: tuple, path: str):
    games = sorted(changes, key=changes.get)
    values = [changes[g] for g in games]
    fig, ax = plt.subplots(figsize=(max(7, 0.22 * len(games) + 2), 4))
    ax.bar(games, values, color=["tab:red" if v > 0 else "tab:gray" for v in values])
    ax.set_yscale("symlog", linthresh=10)
    ax.axhline(0, color="black", lw=0.5)
    ax.set(ylabel="relative change (%)", title=f"{label(variant)} against {variant[0].upper()} k=0, final scores\n"
           "100 (ME - base) / (max(human, base) - random)")
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    save(fig, path)


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def markdown_table(rows: list, columns: list) -> str:
    def cell(value):
        return f"{value:.3f}" if isinstance(value, float) else str(value).replace("|", "\\|")  # k=|A| in a table

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def missing_data(variants: dict, all_games: list, aggregate_notes: dict, curve_notes: dict, problems: list) -> list:
    """Every gap, as one sentence each: games and seeds not run, runs not finished, data left out."""
    seeds = sorted({r.seed for runs in variants.values() for r in runs})
    lines = []
    for variant, runs in sorted(variants.items()):
        name = label(variant)
        have = collections.defaultdict(set)
        for run in runs:
            have[run.game].add(run.seed)
        absent = [g for g in all_games if g not in have]
        if absent:
            lines.append(f"{name}: no run at all for {len(absent)} of {len(all_games)} games: {', '.join(absent)}")
        for game in sorted(have):
            if have[game] != set(seeds):
                lines.append(f"{name}, {game}: no run for seed(s) {sorted(set(seeds) - have[game])} (seeds seen: {seeds})")
        for run in sorted(runs, key=lambda r: r.path):
            if run.final is None:
                lines.append(f"{name}, {run.game}, seed {run.seed}: unfinished (no final_eval.json; last logged step "
                             f"{run.last_step:,}): in the curves, not in the final scores ({run.path})")
        lines += [f"{name}, final-score aggregate: {note}" for note in aggregate_notes.get(variant, [])]
        lines += [f"{name}, IQM curve: {note}" for note in curve_notes.get(variant, [])]
    lines += [f"not read: {p}" for p in problems]
    return lines


def drop_duplicates(runs: list):
    """One run per (algo, k, game, seed): the one that got furthest. Returns (runs kept, the others as sentences)."""
    groups = collections.defaultdict(list)
    for run in runs:
        groups[(*run.variant, run.game, run.seed)].append(run)
    kept, notes = [], []
    for group in groups.values():
        group.sort(key=lambda r: (r.final is not None, r.last_step, r.path), reverse=True)
        kept.append(group[0])
        notes += [f"{other.path}: left out, the same algo, k, game and seed as {group[0].path}, which got further "
                  "(runs of different protocols belong in different --runs-dir folders)" for other in group[1:]]
    return sorted(kept, key=lambda r: r.path), notes


def write_csv(path: str, rows: list, columns: list):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(args: Args):
    if not os.path.isdir(args.runs_dir):
        fail(f"--runs-dir {args.runs_dir!r} does not exist")
    if not os.path.isfile(args.games_csv):
        fail(f"--games-csv {args.games_csv!r} does not exist")
    for name in ("reps", "curve_reps", "curve_points", "workers"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    env_games, game_scores = read_games(args.games_csv)
    runs, problems = find_runs(args.runs_dir, args.workers)
    for run in list(runs):
        if run.env_id not in env_games:
            problems.append(f"{run.path}: env {run.env_id} is not a game of {args.games_csv}")
            runs.remove(run)
        else:
            run.game = env_games[run.env_id]
    if not runs:
        fail(f"no run found under {args.runs_dir!r} (a run is a directory with the config.json the scripts write)"
             + (": " + "; ".join(problems) if problems else ""))
    runs, duplicates = drop_duplicates(runs)
    problems += duplicates
    os.makedirs(args.out_dir, exist_ok=True)
    variants = collections.defaultdict(list)
    for run in runs:
        variants[run.variant].append(run)

    per_game = per_game_rows(variants, game_scores)
    game_columns = ["algo", "me_coef", "game", "seeds", "n_seeds", "mean", "std", "human_normalized", "random_score", "human_score"]
    write_csv(os.path.join(args.out_dir, "per_game.csv"), per_game, game_columns)
    aggregates, aggregate_notes = aggregate_rows(variants, game_scores, args)
    aggregate_columns = ["algo", "me_coef", "metric", "value", "ci_low", "ci_high", "games", "seeds"]
    write_csv(os.path.join(args.out_dir, "aggregate.csv"), aggregates, aggregate_columns)

    figures = []  # (file, caption)
    curves, curve_notes = {}, {}
    for variant, variant_runs in variants.items():
        curve, curve_notes[variant] = aggregate_curve(variant_runs, game_scores, args)
        if curve is not None:
            curves[variant] = curve
    if curves:
        plot_aggregate(curves, os.path.join(args.out_dir, "aggregate_iqm.png"))
        figures.append(("aggregate_iqm.png", "IQM human-normalized evaluation score vs agent steps, 95% stratified bootstrap CI. "
                        + " ".join(f"{label(v)}: {c[4]}." for v, c in sorted(curves.items()))))
    plot_per_game(variants, os.path.join(args.out_dir, "per_game_curves.png"))
    figures.append(("per_game_curves.png", "Evaluation score (raw game score) of every game vs agent steps."))
    plot_across_games(variants, "metrics/action_gap", "action gap (largest Q - second largest Q)",
                      os.path.join(args.out_dir, "action_gap.png"))
    figures.append(("action_gap.png", "Action gap vs agent steps (the paper's claim 2: larger with mean-expansion)."))
    plot_across_games(variants, "eval/overestimation", "overestimation (predicted Q - discounted return)",
                      os.path.join(args.out_dir, "overestimation.png"))
    figures.append(("overestimation.png", "Overestimation on evaluation episodes vs agent steps (claim 3: less with mean-expansion)."))
    finals = {(r["algo"], r["me_coef"], r["game"]): r["mean"] for r in per_game}
    for variant in sorted(variants):
        if variant[1] == "0" or (variant[0], "0") not in variants:
            continue
        changes = {g: relative_change(finals[(*variant, g)], finals[(variant[0], "0", g)], *game_scores[g])
                   for (a, k, g) in finals if (a, k) == variant and (a, "0", g) in finals}
        if changes:
            name = f"relative_change_{variant[0]}_k{variant[1].replace('|A|', 'A')}.png"
            plot_relative_change(changes, variant, os.path.join(args.out_dir, name))
            figures.append((name, f"Per game, {label(variant)} against {variant[0].upper()} k=0 on the final evaluation "
                            f"({len(changes)} games with both)."))

    missing = missing_data(variants, sorted(game_scores), aggregate_notes, curve_notes, problems)
    summary = [dict(algo=v[0], me_coef=v[1], games=len({r.game for r in rs}), seeds=" ".join(map(str, sorted({r.seed for r in rs}))),
                    finished=sum(r.final is not None for r in rs), unfinished=sum(r.final is None for r in rs))
               for v, rs in sorted(variants.items())]
    report = [
        "# Results",
        "",
        f"Written by `plot_results.py` on {datetime.datetime.now():%Y-%m-%d %H:%M} from `{args.runs_dir}`: {len(runs)} runs "
        f"read ({sum(r.final is not None for r in runs)} finished).",
        "",
        "## Runs",
        "",
        markdown_table(summary, ["algo", "me_coef", "games", "seeds", "finished", "unfinished"]),
        "",
        "## Aggregate human-normalized scores (final evaluation)",
        "",
        "Human-normalized score: (score - random) / (human - random), from `atari57.csv`. IQM, median, mean and "
        "optimality gap over the matrix of runs (seeds x games), with 95% stratified bootstrap confidence intervals "
        f"({args.reps} resamples; rliable). `games` and `seeds` say what each row rests on. The probability of improvement is "
        "P(mean-expansion > baseline) on a game, averaged over the games both have.",
        "",
        markdown_table(aggregates, aggregate_columns) if aggregates else "No finished run yet: no final scores.",
        "",
        "## Figures",
        "",
    ]
    for name, caption in figures:
        report += [f"![{name}]({name})", "", caption, ""]
    report += ["## Per-game final scores", "", markdown_table(per_game, game_columns) if per_game else "None yet.", "",
               "## What is missing", ""]
    report += [f"- {line}" for line in missing] or ["Nothing: every variant has every game and seed, all finished."]
    with open(os.path.join(args.out_dir, "report.md"), "w") as f:
        f.write("\n".join(report) + "\n")
    print(f"{len(runs)} runs in {len(variants)} variants -> {args.out_dir}/report.md ({len(missing)} gaps listed there)")


if __name__ == "__main__":
    main(tyro.cli(Args))
