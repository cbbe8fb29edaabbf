"""From a folder of runs to the paper's tables and figures.

    python plot_results.py --runs-dir runs --out-dir report

Reads every run directory that dqn_atari_meanexp.py, iqn_atari_meanexp.py or dqn_minatar_meanexp.py wrote (config.json,
final_eval.json and the TensorBoard events, or the curves.json of a record that --records-dir wrote) and writes to --out-dir,
for the Atari runs:

- per_game.csv: the final evaluation score of each variant (the paper's rows: DQN, IB-DQN(k), Dueling
  DQN, RDQ, IQN, ...) and game over its seeds, its human-normalized score (0 = random play, 1 = human,
  from atari57.csv: the authors' table by default, DQN Zoo's with --score-table dqn_zoo; they differ only in
  VideoPinball's random score, docs/human_normalized_scores.md), and its overestimation;
- aggregate.csv: IQM, median, mean and optimality gap of human-normalized scores with 95%
  stratified bootstrap confidence intervals, and the probability that a mean-expansion variant improves
  on each of its baselines (Agarwal et al. 2021, computed with their rliable package);
- overestimation.csv: the authors' overestimation and normalized overestimation of the final evaluation,
  median and mean over games, per variant;
- k_sensitivity.csv and k_sensitivity.png: the authors' k figure (their plotting/plot_hypers_perf.py): for each
  algorithm and game run at two or more k with the same network, optimizer and loss, the AUC of the human-normalized
  evaluation score against k;
- figures: aggregate IQM vs steps, per-game learning curves, action gap and (normalized) overestimation
  vs steps, final overestimation per variant, and per game the relative change of each mean-expansion
  variant over each of its baselines;
- for the MinAtar runs (no human scores: the Atari tables do not apply), minatar_per_game.csv (per variant and game the
  AUC of the evaluation scores and the final score, with 95% intervals over seeds), minatar_aggregate.csv (IQM of the
  baseline-normalized AUC over games and seeds, rliable's stratified bootstrap, and the probability of improvement),
  minatar_claims.csv (claims 2 and 3 as for Atari) and their figures;
- report.md: all of it, with how many games and seeds each number rests on and what is missing.

--records-dir DIR also keeps each finished run's record, small enough to commit: DIR/NAME/config.json, final_eval.json and
curves.json (the curves these tables read, and the run's wall time), and a part file DIR/_parts/DATE.json naming the runs
it added with their CPU model. plot_results.py reads a folder of records as it reads the runs.

Algorithm, variant (algorithm, network, optimizer, loss, k), game and seed come from each run's recorded
settings (config.json), never from its directory name. Partial results (missing games or seeds, unfinished runs) are used where they can
be and listed in report.md; nothing is dropped without being named there.
"""

import collections
import csv
import datetime
import glob
import json
import multiprocessing
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402
from rliable import library as rly  # noqa: E402
from rliable import metrics  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.compat.tensorflow_stub import errors as tf_errors, pywrap_tensorflow  # noqa: E402 (the events' reader)

HERE = os.path.dirname(os.path.abspath(__file__))
# rliable hands arch a numpy RandomState, which arch 7 deprecates; the bootstrap is the same
warnings.filterwarnings("ignore", message="random_state is deprecated", category=FutureWarning)


@dataclass
class Args:
    runs_dir: str = "runs"
    """the folder holding the run directories (as run_all.sh and the scripts write them)"""
    out_dir: str = "report"
    """where the tables, figures and report.md are written (created if needed; these files are replaced)"""
    games_csv: str = os.path.join(HERE, "atari57.csv")
    """the games with their ids and their random and human scores"""
    minatar_csv: str = os.path.join(HERE, "minatar5.csv")
    """the MinAtar games with their ids (dqn_minatar_meanexp.py's runs)"""
    records_dir: Optional[str] = None
    """if given, also write each finished run's record here (config.json, final_eval.json, curves.json), to commit"""
    score_table: Literal["authors", "dqn_zoo"] = "authors"
    """the random scores of the human-normalized score: the authors' (their ale_utils; VideoPinball 0) or DQN Zoo's
    (VideoPinball 16,256.9); the only difference (docs/human_normalized_scores.md)"""
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
CURVE_TAGS = ("eval/episodic_return", "eval/overestimation", "eval/normalized_overestimation", "metrics/action_gap",
              "claims/relative_action_gap")
# claims 2 and 3 as the authors' plotting/two_alg_aux.py computes them: per run, the mean over its evaluation rows of
CLAIM_TAGS = {"relative_action_gap": "claims/relative_action_gap", "overestimation": "eval/overestimation"}
AUTHORS_GAP_CLIP = (-20, 0.01)  # the authors clip each game's relative action gap increase to this range; we do not
OVERESTIMATION = ("overestimation", "normalized_overestimation", "mean_q")  # of final_eval.json
RECORD_CURVES = "curves.json"  # a record's curves (--records-dir): what this tool reads of a run's TensorBoard events
Z_95 = 1.959963984540054  # the authors' 95% interval (plot-ci): norm.ppf(0.975) standard errors over seeds

# The paper's rows by their settings (algo, network, optimizer, loss, k), in the order tables list them
PAPER_VARIANTS = {
    ("dqn", "nature", "adam", "sse", "0"): "DQN",
    ("dqn", "nature", "adam", "sse", "|A|"): "IB-DQN(k)",
    ("dqn", "nature", "adam", "sse", "1"): "IB-DQN(1)",
    ("dqn", "nature", "rmsprop", "huber", "0"): "DQN (RMSprop, Huber)",
    ("dqn", "nature", "rmsprop", "huber", "|A|"): "IB-DQN (RMSprop, Huber)",
    ("dqn", "dueling", "adam", "sse", "0"): "Dueling DQN",
    ("dqn", "rdq", "adam", "mse", "0"): "RDQ",
    ("iqn", "iqn", "adam", "quantile_huber", "0"): "IQN",
    ("iqn", "iqn", "adam", "quantile_huber", "|A|"): "IB-IQN",
}
DEFAULT_SETTINGS = {"dqn": ("nature", "adam", "sse"), "iqn": ("iqn", "adam", "quantile_huber")}  # network, optimizer, loss
EXTRA_BASELINES = {"IB-DQN(k)": ("Dueling DQN", "RDQ")}  # besides its own k = 0, the paper compares IB-DQN(k) with these
# --score-table: atari57.csv's column of random scores, and what the report says of it. The authors' differs from DQN
# Zoo's in one game, so the paper's figures and tables need theirs (docs/human_normalized_scores.md)
SCORE_TABLES = {
    "authors": ("authors_random_score", "the authors' table (their ale_utils, from Agent57's Table H.4: VideoPinball's "
                "random score 0)"),
    "dqn_zoo": ("random_score", "DQN Zoo's table (VideoPinball's random score 16,256.9; the authors' is 0)"),
}


def variant_name(algo: str, network: str, optimizer: str, loss: str, k: str) -> str:
    """The paper's name of a row (DQN, IB-DQN(k), RDQ, ...), or ALGO k=K with the settings that differ from the defaults."""
    if (algo, network, optimizer, loss, k) in PAPER_VARIANTS:
        return PAPER_VARIANTS[(algo, network, optimizer, loss, k)]
    differ = [value for value, default in zip((network, optimizer, loss), DEFAULT_SETTINGS[algo]) if value != default]
    return f"{algo.upper()} k={k}" + (f" ({', '.join(differ)})" if differ else "")


def variant_order(name: str) -> tuple:
    order = list(PAPER_VARIANTS.values())
    return (order.index(name) if name in order else len(order), name)


# ---------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------


@dataclass
class Run:
    path: str
    algo: str
    variant: str  # the paper's name of its row (variant_name)
    env_id: str
    k: str  # "0", "1.5", ... or "|A|" (the scripts' default, the number of actions)
    baselines: tuple  # the variants it is compared with where it has k > 0: its settings at k = 0, and EXTRA_BASELINES
    seed: int
    eval_interval: int
    final: Optional[dict]  # final_eval.json, None while the run is unfinished
    curves: dict  # tag -> (steps, values) arrays
    last_step: int
    game: str = ""  # from env_id, through atari57.csv
    settings: tuple = ()  # network, optimizer, loss
    me_coef: float = 0.0  # k as a number (|A| as the run's number of actions)
    damaged: tuple = ()  # what is wrong with its event files (damaged_events): its curves stop where the damage is
    wall_seconds: Optional[float] = None  # from its first logged point to its last (a resumed run: the pause included)


def read_run(path: str):
    """A Run, or a string saying why path is not a readable run."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        me_coef, algo = float(config["me_coef"]), config["algo"]
        k = "|A|" if config.get("me_coef_default") and me_coef > 0 else f"{me_coef:g}"  # dueling and RDQ default to 0
        settings = tuple(config.get(name, default) for name, default in zip(("network", "optimizer", "loss"), DEFAULT_SETTINGS[algo]))
        variant = variant_name(algo, *settings, k)
        baselines = () if k == "0" else (variant_name(algo, *settings, "0"), *EXTRA_BASELINES.get(variant, ()))
        final = None
        if os.path.exists(os.path.join(path, "final_eval.json")):
            with open(os.path.join(path, "final_eval.json")) as f:
                final = json.load(f)
            final["mean"], final["total_steps"]  # noqa: B018 (what the tables read: a KeyError here names the run)
        if not glob.glob(os.path.join(path, "events.out.tfevents.*")) and os.path.exists(os.path.join(path, RECORD_CURVES)):
            with open(os.path.join(path, RECORD_CURVES)) as f:  # a record (--records-dir): the curves without the events
                record = json.load(f)
            curves = {tag: (np.array([s for s, _ in record["curves"].get(tag, [])], dtype=np.int64),
                            np.array([v for _, v in record["curves"].get(tag, [])], dtype=float)) for tag in CURVE_TAGS}
            last_step, wall_seconds, damaged = int(record["last_step"]), record["wall_seconds"], ()
        else:
            accumulator = EventAccumulator(path, size_guidance={"scalars": 0})  # applies the purges of resumed runs
            accumulator.Reload()
            tags = set(accumulator.Tags()["scalars"])
            curves = {}
            for tag in CURVE_TAGS:
                points = accumulator.Scalars(tag) if tag in tags else []
                curves[tag] = (np.array([p.step for p in points], dtype=np.int64), np.array([p.value for p in points]))
            last_step = max([int(accumulator.Scalars(t)[-1].step) for t in tags] + [0])
            times = [p.wall_time for t in tags for p in (accumulator.Scalars(t)[0], accumulator.Scalars(t)[-1])]
            wall_seconds, damaged = (max(times) - min(times) if times else None), damaged_events(path)
        return Run(path, algo, variant, config["env_id"], k, baselines, int(config["seed"]), int(config.get("eval_interval", 0)),
                   final, curves, max(last_step, final["total_steps"] if final else 0), settings=settings, me_coef=me_coef,
                   damaged=damaged, wall_seconds=wall_seconds)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{path}: not a readable run ({type(error).__name__}: {error})"


def damaged_events(path: str) -> tuple:
    """One sentence per event file of the run that cannot be read to its end (a failed checksum, a cut record): the
    TensorBoard reader stops there without a word, so the run's curves would end early in silence."""
    damaged = []
    for events in sorted(glob.glob(os.path.join(path, "events.out.tfevents.*"))):
        reader = pywrap_tensorflow.PyRecordReader_New(events)
        while True:
            try:
                reader.GetNext()
            except tf_errors.OutOfRangeError:  # the end of the file
                break
            except tf_errors.DataLossError as error:
                why = error.message.replace(events, "").strip()
                damaged.append(f"its event file {os.path.basename(events)} is damaged ({why}): its curves stop there")
                break
    return tuple(damaged)


def find_runs(runs_dir: str, workers: int):
    """Every directory under runs_dir with a config.json, read in parallel: (runs, problems)."""
    paths = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(runs_dir, "**", "config.json"), recursive=True))
    with multiprocessing.Pool(workers) as pool:
        results = pool.map(read_run, paths) if workers > 1 else list(map(read_run, paths))
    return [r for r in results if isinstance(r, Run)], [r for r in results if isinstance(r, str)]


def read_games(games_csv: str, score_table: str = "authors"):
    """{env id: game} for both id columns, and {game: (random score, human score)}, the random scores of score_table."""
    ids, scores = {}, {}
    random_column = SCORE_TABLES[score_table][0]
    with open(games_csv) as f:
        for row in csv.DictReader(f):
            for column in ("ale_v5_id", "noframeskip_v4_id"):
                if row[column]:
                    ids[row[column]] = row["game"]
            scores[row["game"]] = (float(row[random_column]), float(row["human_score"]))
    return ids, scores


# ---------------------------------------------------------------------------
# Scores: human-normalized, arranged as rliable wants them (seeds x games)
# ---------------------------------------------------------------------------


def human_normalized(score, game: str, game_scores: dict):
    random_score, human_score = game_scores[game]
    return (np.asarray(score, dtype=float) - random_score) / (human_score - random_score)


def rectangular(by_game: dict):
    """rliable needs the same number of seeds S for every game. S is the count that uses the most runs, S x the games
    with at least S seeds (the larger S on a tie): games with fewer seeds are left out, games with more use their S
    lowest seeds: 5 games at 2 seeds (10 runs) rather than the 3 of them that have a third seed (9 runs).
    by_game: {game: {seed: value}}. Returns (games, seeds per game, what was left out, as sentences)."""
    counts = {len(seeds) for seeds in by_game.values() if seeds}
    if not counts:
        return [], {}, []
    s = max(counts, key=lambda n: (n * sum(len(seeds) >= n for seeds in by_game.values()), n))
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


def comparisons(variants: dict) -> list:
    """(mean-expansion variant, baseline) pairs with runs of both: each variant with k > 0 against its settings at
    k = 0 (IB-DQN(k) against DQN, IB-IQN against IQN, ...) and IB-DQN(k) also against Dueling DQN and RDQ."""
    return [(variant, baseline) for variant, runs in variants.items() for baseline in runs[0].baselines if baseline in variants]


def interval_estimates(scores: dict, func, reps: int, seed: int):
    """rliable's point estimates and 95% stratified bootstrap intervals, the same on every call with the same seed: rliable
    1.2.0's StratifiedBootstrap draws its resamples from NumPy's global generator (update_indices calls np.random.choice)
    and ignores the random_state it is given, so the global generator is seeded here first."""
    np.random.seed(seed)
    return rly.get_interval_estimates(scores, func, reps=reps, random_state=np.random.RandomState(seed))


def aggregate_rows(variants: dict, game_scores: dict, args: Args):
    """aggregate.csv's rows: the four aggregates per variant, and the probability of improvement over each baseline."""
    rows, matrices, notes = [], {}, {}
    for variant, runs in variants.items():
        matrix, games, notes[variant] = final_matrix(runs, game_scores)
        if matrix.size == 0:
            continue
        matrices[variant] = (matrix, games)
        point, interval = interval_estimates({"x": matrix}, lambda m: np.array([f(m) for f in AGGREGATES.values()]), args.reps,
                                             args.seed)
        for i, metric in enumerate(AGGREGATES):
            rows.append(dict(variant=variant, algo=runs[0].algo, me_coef=runs[0].k, metric=metric, value=float(point["x"][i]),
                             ci_low=float(interval["x"][0, i]), ci_high=float(interval["x"][1, i]), games=len(games),
                             seeds=matrix.shape[0]))
    for variant, baseline in comparisons(variants):
        if variant not in matrices or baseline not in matrices:
            continue
        (matrix, games), (base_matrix, base_games) = matrices[variant], matrices[baseline]
        common = [g for g in games if g in base_games]  # the probability compares the two on the same games
        if not common:
            notes[variant].append(f"no game finished by both it and {baseline}: no probability of improvement")
            continue
        x = matrix[:, [games.index(g) for g in common]]
        y = base_matrix[:, [base_games.index(g) for g in common]]
        point, interval = interval_estimates({"x": [x, y]}, metrics.probability_of_improvement, args.reps, args.seed)
        runs = variants[variant]
        rows.append(dict(variant=f"{variant} vs {baseline}", algo=runs[0].algo, me_coef=runs[0].k,
                         metric="probability_of_improvement", value=float(point["x"]), ci_low=float(interval["x"][0, 0]),
                         ci_high=float(interval["x"][1, 0]), games=len(common), seeds=f"{x.shape[0]} vs {y.shape[0]}"))
    return rows, notes


def mean_of(runs: list, key: str) -> float:
    """The mean over runs of a final_eval.json statistic, NaN where none has it (no evaluation episode finished)."""
    values = [r.final[key] for r in runs if r.final.get(key) is not None]
    return float(np.mean(values)) if values else float("nan")


def per_game_rows(variants: dict, game_scores: dict):
    rows = []
    for variant, runs in variants.items():
        by_game = collections.defaultdict(list)
        for run in runs:
            if run.final is not None:
                by_game[run.game].append(run)
        for game, game_runs in sorted(by_game.items()):
            game_runs.sort(key=lambda r: r.seed)
            scores = np.array([r.final["mean"] for r in game_runs])
            random_score, human_score = game_scores[game]
            rows.append(dict(variant=variant, algo=runs[0].algo, me_coef=runs[0].k, game=game,
                             seeds=" ".join(str(r.seed) for r in game_runs), n_seeds=len(game_runs), mean=scores.mean(),
                             std=scores.std(), human_normalized=float(human_normalized(scores.mean(), game, game_scores)),
                             random_score=random_score, human_score=human_score,
                             **{key: mean_of(game_runs, key) for key in OVERESTIMATION}))
    return rows


def overestimation_rows(per_game: list) -> list:
    """overestimation.csv: per variant and statistic, the median and mean over games of each game's mean over seeds."""
    rows = []
    for variant in sorted({r["variant"] for r in per_game}, key=variant_order):
        for key in OVERESTIMATION:
            values = np.array([r[key] for r in per_game if r["variant"] == variant and np.isfinite(r[key])])
            if len(values):
                rows.append(dict(variant=variant, statistic=key, median_over_games=float(np.median(values)),
                                 mean_over_games=float(values.mean()), games=len(values)))
    return rows


def run_claims(run: Run) -> dict:
    """One run's numbers for claims 2 and 3, as the authors' get_data: the mean over the run's evaluation rows (the
    whole run, not its last evaluation) of the relative action gap and of the overestimation; None without rows."""
    return {key: float(np.mean(run.curves[tag][1])) if len(run.curves[tag][1]) else None for key, tag in CLAIM_TAGS.items()}


def claim_side(runs: list, key: str) -> list:
    """The run_claims number of each run that has it: the authors average these over their score files."""
    return [c[key] for c in map(run_claims, runs) if c[key] is not None]


CLAIM_NUMBERS = {  # per game, from the two sides' per-run numbers v and b (arrays whose last axis is the runs)
    "relative_action_gap_increase": ("relative_action_gap", lambda v, b: v.mean(-1) - b.mean(-1)),
    "overestimation_decrease_pct": ("overestimation", lambda v, b: -(v.mean(-1) - b.mean(-1)) / (np.abs(b.mean(-1)) + 1e-8) * 100),
}


def claim_interval(number, v: list, b: list, reps: int, seed: int) -> tuple:
    """A claim number's 95% percentile bootstrap interval over seeds: each side's runs resampled with replacement, on its
    own (the two sides are independent runs); (None, None) unless both sides have 2 runs or more."""
    if len(v) < 2 or len(b) < 2:
        return None, None
    rng = np.random.default_rng(seed)
    v, b = np.asarray(v), np.asarray(b)
    draws = number(v[rng.integers(0, len(v), (reps, len(v)))], b[rng.integers(0, len(b), (reps, len(b)))])
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(low), float(high)


def claim_rows(variants: dict, reps: int = 2000, seed: int = 0) -> list:
    """claims.csv: per mean-expansion variant, baseline and game (both run), the authors' two per-game numbers:
    relative action gap increase = variant - baseline; % decrease in overestimation = -(variant - baseline) /
    (|baseline| + 1e-8) x 100; each with its 95% bootstrap interval over seeds (ours: the authors give none). Empty
    where a side has no run with the statistic (runs older than it)."""
    rows = []
    for variant, baseline in comparisons(variants):
        by_game = {name: collections.defaultdict(list) for name in (variant, baseline)}
        for name in (variant, baseline):
            for run in variants[name]:
                by_game[name][run.game].append(run)
        for game in sorted(by_game[variant].keys() & by_game[baseline].keys()):
            row, values = dict(variant=variant, baseline=baseline, game=game), {}
            for key in CLAIM_TAGS:
                values[key] = v, b = [claim_side(by_game[name][game], key) for name in (variant, baseline)]
                row |= {f"variant_{key}": float(np.mean(v)) if v else None, f"baseline_{key}": float(np.mean(b)) if b else None,
                        f"variant_{key}_runs": len(v), f"baseline_{key}_runs": len(b)}
            for name, (key, number) in CLAIM_NUMBERS.items():
                v, b = values[key]
                row[name] = float(number(np.array(v), np.array(b))) if v and b else None
                row[f"{name}_ci_low"], row[f"{name}_ci_high"] = claim_interval(number, v, b, reps, seed)
            rows.append(row)
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
        point, interval = interval_estimates({"x": matrix}, metrics.aggregate_iqm, args.curve_reps, args.seed)
        iqm.append(float(point["x"]))
        low.append(float(interval["x"][0, 0]))
        high.append(float(interval["x"][1, 0]))
    note = f"{count(len(games), 'game')} x {count(len(chosen[games[0]]), 'seed')}, up to step {steps[-1]:,}, the last every run used has reached"
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
# k sensitivity: the authors' plotting/plot_hypers_perf.py
# ---------------------------------------------------------------------------


def hns_curves(runs: list, game_scores: dict) -> dict:
    """{seed: {step: human-normalized evaluation score}} of the runs of one game at one k."""
    curves = {}
    for run in runs:
        points = eval_points(run, "eval/episodic_return")
        if points:
            curves[run.seed] = {step: float(human_normalized(v, run.game, game_scores)) for step, v in points.items()}
    return curves


def area_under_curve(curves: dict):
    """The authors' AUC of one game at one k: the mean over evaluation steps of the mean over seeds, on the steps every
    seed has (what their --plot-partial does; when every seed has all 200 evaluations, what their default does).
    Also the standard error over seeds of each seed's AUC on those steps (their --plot-ci takes 1.96 of it).
    Returns the numbers of a k_sensitivity.csv row, or None where the seeds share no step."""
    common = sorted(set.intersection(*(set(c) for c in curves.values())))
    if not common:
        return None
    table = np.array([[curves[seed][step] for step in common] for seed in sorted(curves)])  # seeds x steps
    seed_aucs = table.mean(axis=1)
    se = float(seed_aucs.std(ddof=1) / np.sqrt(len(seed_aucs))) if len(seed_aucs) > 1 else float("nan")
    return dict(seeds=" ".join(map(str, sorted(curves))), n_seeds=len(curves), points=len(common), first_step=common[0],
                last_step=common[-1], longest_step=max(max(c) for c in curves.values()),
                auc=float(table.mean(axis=0).mean()), seed_auc_se=se)


def settings_label(algo: str, settings: tuple) -> str:
    """DQN (nature, adam, sse): what the runs of one k-sensitivity sweep share."""
    return f"{algo.upper()} ({', '.join(settings)})"


def sweep_of(row: dict) -> tuple:
    """(algo, settings) of a k_sensitivity.csv row."""
    return row["algo"], (row["network"], row["optimizer"], row["loss"])


def k_sensitivity(runs: list, game_scores: dict):
    """k_sensitivity.csv's rows: per algorithm, settings (network, optimizer, loss), game and k, the AUC, for the games
    with an AUC at two or more k of the same algorithm and settings. Returns (rows, notes): the games and k left out, named
    for the algorithms and settings where some game has two k (a batch of one k per game is no sweep), and steps_notes."""
    cells = collections.defaultdict(list)  # (algo, settings, game, k) -> runs
    for run in runs:
        cells[(run.algo, run.settings, run.game, run.k)].append(run)
    by_game = collections.defaultdict(list)  # (algo, settings, game) -> one row per k
    gaps = collections.defaultdict(list)  # (algo, settings) -> what was left out, as sentences
    for (algo, settings, game, k), cell_runs in sorted(cells.items()):
        curves = hns_curves(cell_runs, game_scores)
        numbers = area_under_curve(curves) if curves else None
        if numbers is None:
            why = "its seeds share no evaluation step" if curves else "no evaluation point yet"
            gaps[(algo, settings)].append(f"{game}, k = {k}: {why}: no AUC")
            continue
        by_game[(algo, settings, game)].append(dict(algo=algo, network=settings[0], optimizer=settings[1], loss=settings[2],
                                                    game=game, k=k, me_coef=cell_runs[0].me_coef, **numbers))
    rows = []
    for (algo, settings, game), game_rows in by_game.items():
        if len(game_rows) > 1:
            rows += sorted(game_rows, key=lambda r: r["me_coef"])
        else:
            gaps[(algo, settings)].append(f"{game}: an AUC at k = {game_rows[0]['k']} only: left out")
    swept = sorted({sweep_of(r) for r in rows})
    notes = [f"{settings_label(*group)}, {gap}" for group in swept for gap in gaps[group]]
    return rows, notes + steps_notes(rows)


def steps_notes(rows: list) -> list:
    """Sentences on AUCs that rest on fewer evaluation steps than some of their seeds reached, and on games whose k
    values rest on different steps (an AUC over the first 10M steps is not comparable with one over 50M)."""
    notes, spans = [], collections.defaultdict(set)
    for r in rows:
        where = f"{settings_label(*sweep_of(r))}, {r['game']}"
        spans[where].add((r["first_step"], r["last_step"], r["points"]))
        if r["longest_step"] > r["last_step"]:
            notes.append(f"{where}, k = {r['k']}: its seeds reach different steps (the furthest {r['longest_step']:,}): "
                         f"the AUC uses the {r['points']} steps all {r['n_seeds']} have, "
                         f"{r['first_step']:,} to {r['last_step']:,}")
    for where, span in spans.items():
        if len(span) > 1:
            steps = "; ".join(f"{a:,} to {b:,}, {n} points" for a, b, n in sorted(span))
            notes.append(f"{where}: its k values rest on different evaluation steps ({steps}): "
                         "not comparable until all finish")
    return notes


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------

COLORS = {"DQN": "tab:gray", "IB-DQN(k)": "tab:red", "IB-DQN(1)": "tab:orange", "DQN (RMSprop, Huber)": "black",
          "IB-DQN (RMSprop, Huber)": "tab:purple", "Dueling DQN": "tab:blue", "RDQ": "tab:green", "IQN": "tab:gray",
          "IB-IQN": "tab:red"}  # baselines dark, the paper's k = |A| red
OTHER_COLORS = ["tab:cyan", "tab:olive", "tab:brown", "tab:pink"]  # other variants, in the order met
LINESTYLES = {"dqn": "-", "iqn": "--"}


def color(variant: str) -> str:
    if variant not in COLORS:
        COLORS[variant] = OTHER_COLORS[sum(v not in PAPER_VARIANTS.values() for v in COLORS) % len(OTHER_COLORS)]
    return COLORS[variant]


def by_algo(variants: dict) -> dict:
    algos = collections.defaultdict(dict)
    for variant, runs in variants.items():
        algos[runs[0].algo][variant] = runs
    return algos


def save(fig, path: str):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_aggregate(curves: dict, variants: dict, path: str):
    algos = by_algo(variants)
    fig, axes = plt.subplots(1, len(algos), figsize=(5.5 * len(algos), 4), squeeze=False)
    for ax, (algo, algo_variants) in zip(axes[0], sorted(algos.items())):
        for variant in algo_variants:
            if variant in curves:
                steps, iqm, low, high, _ = curves[variant]
                ax.plot(steps / 1e6, iqm, color=color(variant), label=variant)
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
        for variant, runs in variants.items():
            curves = [eval_points(r, "eval/episodic_return") for r in runs if r.game == game]
            curves = [c for c in curves if c]
            if not curves:
                continue
            steps = sorted(set().union(*curves))
            table = np.array([[c.get(s, np.nan) for s in steps] for c in curves])
            x = np.array(steps) / 1e6
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a step only some seeds reached
                ax.plot(x, np.nanmean(table, axis=0), color=color(variant), ls=LINESTYLES.get(runs[0].algo, ":"), lw=1,
                        label=variant)
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
                ax.plot(centers, curve[0], color=color(variant), label=variant)
                ax.fill_between(centers, curve[1], curve[2], color=color(variant), alpha=0.2)
        ax.set(title=algo.upper(), xlabel="agent steps (millions)", ylabel=title)
        ax.legend()
    fig.suptitle(f"{title}: median over games of the mean over seeds; band: 25th to 75th percentile over games", fontsize=9)
    save(fig, path)


def relative_change(me: float, base: float, random_score: float, human_score: float) -> float:
    """Percent change of mean-expansion over the baseline, normalized as in the dueling-network paper
    (Wang et al. 2016): 100 (me - base) / (max(human, base) - random)."""
    return 100.0 * (me - base) / (max(human_score, base) - random_score)


def plot_relative_change(changes: dict, variant: str, baseline: str, path: str):
    games = sorted(changes, key=changes.get)
    values = [changes[g] for g in games]
    fig, ax = plt.subplots(figsize=(max(7, 0.22 * len(games) + 2), 4))
    ax.bar(games, values, color=["tab:red" if v > 0 else "tab:gray" for v in values])
    ax.set_yscale("symlog", linthresh=10)
    ax.axhline(0, color="black", lw=0.5)
    ax.set(ylabel="relative change (%)", title=f"{variant} against {baseline}, final scores\n"
           "100 (variant - baseline) / (max(human, baseline) - random)")
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    save(fig, path)


def plot_claim_bars(values: dict, ylabel: str, title: str, path: str):
    """The authors' per-game bars (plotting/two_alg_aux.py): sorted, the smallest first."""
    games = sorted(values, key=values.get)
    fig, ax = plt.subplots(figsize=(max(7, 0.22 * len(games) + 2), 4))
    ax.bar(games, [values[g] for g in games], color=["tab:red" if values[g] > 0 else "tab:gray" for g in games])
    ax.axhline(0, color="black", lw=0.5)
    ax.set(ylabel=ylabel, title=title)
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    save(fig, path)


def claim_figures(claims: list, out_dir: str, prefix: str = "") -> list:
    """The authors' per-game bars of claims 2 and 3 for each comparison of claims: [(file, caption)]."""
    figures = []
    for variant, baseline in dict.fromkeys((r["variant"], r["baseline"]) for r in claims):
        pair = [r for r in claims if (r["variant"], r["baseline"]) == (variant, baseline)]
        for key, ylabel, what in (("relative_action_gap_increase", "relative action gap increase", "Relative action gap"),
                                  ("overestimation_decrease_pct", "% decrease in overestimation", "Overestimation")):
            values = {r["game"]: r[key] for r in pair if r[key] is not None}
            if not values:
                continue
            name = f"{prefix}claims_{key}_{slug(variant)}_vs_{slug(baseline)}.png"
            plot_claim_bars(values, ylabel, f"{what}: {variant} against {baseline}, whole-run means", os.path.join(out_dir, name))
            clip = f" Unclipped: the authors' figure clips each bar to {AUTHORS_GAP_CLIP}." if key.startswith("relative") else ""
            figures.append((name, f"Per game, {ylabel} of {variant} against {baseline}, as the authors' "
                            f"plotting/two_alg_aux.py computes it ({count(len(values), 'game')}).{clip}"))
    return figures


def plot_k_sensitivity(rows: list, path: str):
    """The authors' k figure: per game the AUC against k > 0 on a log axis, and its AUC at k = 0 as a dashed line of the
    game's colour (k = 0 has no place on a log axis); one panel per algorithm and settings."""
    sweeps = sorted({sweep_of(r) for r in rows})
    fig, axes = plt.subplots(1, len(sweeps), figsize=(6 * len(sweeps), 4.8), squeeze=False)
    for ax, sweep in zip(axes[0], sweeps):
        sweep_rows = [r for r in rows if sweep_of(r) == sweep]
        games = sorted({r["game"] for r in sweep_rows})
        colors = plt.get_cmap("tab10" if len(games) <= 10 else "tab20")
        for i, game in enumerate(games):
            points = sorted((r["me_coef"], r["auc"]) for r in sweep_rows if r["game"] == game)
            above_zero = [(k, auc) for k, auc in points if k > 0]
            if above_zero:
                ax.plot(*zip(*above_zero), marker="o", color=colors(i % colors.N), label=game)
            if points[0][0] == 0:
                ax.axhline(points[0][1], color=colors(i % colors.N), ls="--", alpha=0.8)
        ks = dict(sorted((r["me_coef"], f"|A| = {r['me_coef']:g}" if r["k"] == "|A|" else r["k"]) for r in sweep_rows
                         if r["me_coef"] > 0))
        ax.set_xscale("log")
        ax.set_xticks(list(ks), labels=list(ks.values()))
        ax.minorticks_off()
        ax.plot([], [], color="black", ls="--", label="dashed: k = 0 (game's colour)")
        ax.set(title=settings_label(*sweep), xlabel="mean-scaling coefficient k (log scale)",
               ylabel="AUC of the human-normalized score\n(mean over evaluations of the mean over seeds)")
        ax.legend(fontsize=7, ncol=1 + len(games) // 15)
    save(fig, path)


def plot_final_overestimation(per_game: list, path: str) -> bool:
    """Per variant, the spread over games of the final evaluation's overestimation and normalized overestimation
    (each game: the mean over its seeds). Returns False, drawing nothing, where no run has either."""
    names = sorted({r["variant"] for r in per_game}, key=variant_order)
    panels = [("overestimation", "overestimation (Q - discounted return)"),
              ("normalized_overestimation", "normalized overestimation (/ |mean Q|)")]
    data = {key: [[r[key] for r in per_game if r["variant"] == n and np.isfinite(r[key])] for n in names] for key, _ in panels}
    if not any(any(d) for d in data.values()):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.6 * len(names) + 3), 4.5))
    for ax, (key, title) in zip(axes, panels):
        shown = [(n, d) for n, d in zip(names, data[key]) if d]
        box = ax.boxplot([d for _, d in shown], tick_labels=[n for n, _ in shown], patch_artist=True)
        for patch, (n, _) in zip(box["boxes"], shown):
            patch.set_facecolor(color(n))
            patch.set_alpha(0.5)
        ax.axhline(0, color="black", lw=0.5)
        ax.set(title=title, ylabel="over games (each: mean over seeds)")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.suptitle("Final evaluation: the authors' overestimation, per variant", fontsize=9)
    save(fig, path)
    return True


def slug(name: str) -> str:
    """A file-name part for a variant name: IB-DQN(k) -> ib_dqn_k."""
    return "_".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


# ---------------------------------------------------------------------------
# MinAtar: no human scores; per game the AUC of raw scores, across games the AUC normalized by the baseline's
# ---------------------------------------------------------------------------


def read_minatar_games(minatar_csv: str) -> dict:
    """{env id: game} of minatar5.csv, its -v0 ids too (the same games; gymnasium calls them out of date)."""
    with open(minatar_csv) as f:
        rows = list(csv.DictReader(f))
    return {row["env_id"].replace("-v1", version): row["game"] for row in rows for version in ("-v1", "-v0")}


def seed_aucs(runs: list) -> Optional[dict]:
    """The authors' AUC, per seed: {seed: mean of its evaluation scores over the steps all the runs have}, and those steps;
    None where they share none."""
    curves = {run.seed: eval_points(run, "eval/episodic_return") for run in runs}
    curves = {seed: points for seed, points in curves.items() if points}
    common = sorted(set.intersection(*(set(c) for c in curves.values()))) if curves else []
    if not common:
        return None
    return {seed: float(np.mean([points[step] for step in common])) for seed, points in sorted(curves.items())}, common


def interval(values) -> float:
    """Half the width of the 95% interval of the mean of values over seeds (1.96 standard errors); NaN for one seed."""
    values = np.asarray(values, dtype=float)
    return float(Z_95 * values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def minatar_per_game(variants: dict) -> tuple:
    """minatar_per_game.csv's rows: per variant and game, the AUC (the mean over seeds of each seed's AUC, which is the
    authors' mean over steps of the mean over seeds) and the final score, each with its 95% interval over seeds; and
    {(variant, game): {seed: AUC}} for the aggregate. Returns (rows, aucs, notes)."""
    rows, aucs, notes = [], {}, []
    for variant, runs in variants.items():
        for game in sorted({r.game for r in runs}):
            game_runs = [r for r in runs if r.game == game]
            found = seed_aucs(game_runs)
            if found is None:
                notes.append(f"{variant}, {game}: no evaluation step all its runs have: no AUC")
                continue
            by_seed, steps = found
            aucs[(variant, game)] = by_seed
            finals = [r.final["mean"] for r in game_runs if r.final is not None]
            rows.append(dict(variant=variant, me_coef=runs[0].k, game=game, seeds=" ".join(map(str, by_seed)),
                             n_seeds=len(by_seed), points=len(steps), last_step=steps[-1],
                             auc=float(np.mean(list(by_seed.values()))), auc_ci=interval(list(by_seed.values())),
                             final_mean=float(np.mean(finals)) if finals else float("nan"), final_ci=interval(finals),
                             finished=len(finals)))
    return rows, aucs, notes


def minatar_aggregate(variants: dict, aucs: dict, args: Args) -> tuple:
    """minatar_aggregate.csv's rows: for each mean-expansion variant against its baseline, on the games both have, each
    seed's AUC divided by the baseline's mean AUC on that game over the seeds the aggregate uses (so the baseline's mean
    is 1 on every game); the IQM over the (seeds x games) matrix of each side with 95% stratified bootstrap intervals,
    and the probability that the variant's AUC beats the baseline's on a game (rliable). Returns (rows, notes)."""
    rows, notes = [], []
    for variant, baseline in comparisons(variants):
        games = sorted(g for (v, g) in aucs if v == variant and (baseline, g) in aucs)
        picked = {}
        for side in (variant, baseline):  # which seeds of each game (rliable's matrix is rectangular)
            _, chosen, side_notes = rectangular({g: aucs[(side, g)] for g in games})
            notes += [f"{variant} vs {baseline}, {side}: {n}" for n in side_notes]
            picked[side] = chosen
        both = [g for g in games if g in picked[variant] and g in picked[baseline]]
        scale = {g: np.mean([aucs[(baseline, g)][seed] for seed in picked[baseline][g]]) for g in both}
        common = [g for g in both if scale[g] > 0]
        notes += [f"{variant} vs {baseline}, {g}: the baseline's mean AUC is not > 0: no normalized AUC"
                  for g in both if g not in common]
        if not common:
            continue
        x, y = (to_matrix({g: aucs[(side, g)] for g in common}, common, picked[side], lambda g, auc: auc / scale[g])
                for side in (variant, baseline))
        point, ci = interval_estimates({variant: x, baseline: y}, metrics.aggregate_iqm, args.reps, args.seed)
        for side, matrix in ((variant, x), (baseline, y)):
            rows.append(dict(comparison=f"{variant} vs {baseline}", variant=side, metric="iqm_normalized_auc",
                             value=float(point[side]), ci_low=float(ci[side][0, 0]), ci_high=float(ci[side][1, 0]),
                             games=len(common), seeds=matrix.shape[0]))
        point, ci = interval_estimates({"x": [x, y]}, metrics.probability_of_improvement, args.reps, args.seed)
        rows.append(dict(comparison=f"{variant} vs {baseline}", variant=variant, metric="probability_of_improvement",
                         value=float(point["x"]), ci_low=float(ci["x"][0, 0]), ci_high=float(ci["x"][1, 0]),
                         games=len(common), seeds=f"{x.shape[0]} vs {y.shape[0]}"))
    return rows, notes


def plot_minatar_curves(variants: dict, path: str):
    """Per game the evaluation score against steps: the mean over seeds with its 95% interval (1.96 standard errors)."""
    games = sorted({r.game for runs in variants.values() for r in runs})
    fig, axes = plt.subplots(1, len(games), figsize=(3.4 * len(games), 3.2), squeeze=False)
    for ax, game in zip(axes[0], games):
        for variant, runs in variants.items():
            curves = [c for c in (eval_points(r, "eval/episodic_return") for r in runs if r.game == game) if c]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))  # the steps every seed has reached
            table = np.array([[c[s] for s in steps] for c in curves])
            half = np.array([interval(column) for column in table.T]) if len(curves) > 1 else np.zeros(len(steps))
            x = np.array(steps) / 1e6
            ax.plot(x, table.mean(axis=0), color=color(variant), marker=".", label=f"{variant} ({len(curves)} seeds)")
            ax.fill_between(x, table.mean(axis=0) - half, table.mean(axis=0) + half, color=color(variant), alpha=0.2)
        ax.set(title=game.removeprefix("minatar_"), xlabel="agent steps (millions)")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("evaluation score")
    fig.suptitle("MinAtar: evaluation score, mean over seeds with its 95% interval (1.96 standard errors)", fontsize=9)
    save(fig, path)


def plot_minatar_aggregate(rows: list, aucs: dict, path: str):
    """Per comparison: the IQM of the baseline-normalized AUC of each side with its 95% bootstrap interval, and each
    game's normalized AUC (mean over seeds) as a dot."""
    pairs = list(dict.fromkeys(r["comparison"] for r in rows))
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 3.6), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        sides = [r for r in rows if r["comparison"] == pair and r["metric"] == "iqm_normalized_auc"]
        baseline = sides[1]["variant"]
        for i, r in enumerate(sides):
            ax.errorbar([r["value"]], [i], xerr=[[r["value"] - r["ci_low"]], [r["ci_high"] - r["value"]]], fmt="o",
                        color=color(r["variant"]), capsize=4)
            games = sorted(g for (v, g) in aucs if v == r["variant"] and (baseline, g) in aucs)
            mean = lambda name, game: np.mean(list(aucs[(name, game)].values()))  # noqa: E731 (over seeds)
            dots = [mean(r["variant"], g) / mean(baseline, g) for g in games]
            ax.scatter(dots, [i + 0.15] * len(dots), s=12, color=color(r["variant"]), alpha=0.6)
        ax.axvline(1, color="black", lw=0.5)
        ax.set_yticks(range(len(sides)), labels=[r["variant"] for r in sides])
        ax.set_ylim(-0.5, len(sides) - 0.3)
        ax.set(xlabel=f"AUC / {baseline}'s mean AUC on the game", title=f"{pair}: IQM, 95% CI (dots: games)")
    save(fig, path)


def minatar_summary(per_game: list, aggregate: list, claims: list) -> list:
    """The report's summary of each comparison, the lines the README and docs/minatar.md copy (a test holds them equal):
    per game both sides' AUC (± 1.96 standard errors over seeds from 2 seeds on) and the two claim numbers with their 95%
    bootstrap intervals over seeds, then the aggregate's IQM and probability of improvement with their 95% bootstrap
    intervals, and on how many games each claim's number, and its interval, is above 0."""
    def auc(variant, game):
        row = next((r for r in per_game if r["variant"] == variant and r["game"] == game), None)
        if row is None:
            return "-"
        return f"{row['auc']:.1f} ± {row['auc_ci']:.1f} ({row['n_seeds']} seeds)" if row["n_seeds"] > 1 else f"{row['auc']:.1f}"

    k = {r["variant"]: r["me_coef"] for r in per_game}
    lines = ["AUC: ± 1.96 standard errors over seeds (the authors' interval). Claim numbers: in brackets their 95% "
             "bootstrap interval over seeds (ours). Both from 2 seeds on.", ""]
    for variant, baseline in dict.fromkeys((c["variant"], c["baseline"]) for c in claims):
        sides = [f"AUC, {name} (k = {k.get(name, '?')})".replace("|", "\\|") for name in (baseline, variant)]
        pair = [c for c in claims if (c["variant"], c["baseline"]) == (variant, baseline)]
        lines += [f"| game | {sides[0]} | {sides[1]} | relative action gap increase | overestimation decrease, % |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c['game']} | {auc(baseline, c['game'])} | {auc(variant, c['game'])} | "
                  f"{with_interval(c, 'relative_action_gap_increase', '+.4f', '-')} | "
                  f"{with_interval(c, 'overestimation_decrease_pct', '.0f', '-')} |"
                  for c in pair]
        found = {(r["variant"], r["metric"]): r for r in aggregate if r["comparison"] == f"{variant} vs {baseline}"}

        def estimate(side, metric, form):
            r, seeds = found[(side, metric)], min(found[(name, "iqm_normalized_auc")]["seeds"] for name in (variant, baseline))
            return (f"{r['value']:{form}} (95% interval {r['ci_low']:{form}} to {r['ci_high']:{form}})" if seeds > 1
                    else f"{r['value']:{form}} (no interval: one seed)")

        if (variant, "iqm_normalized_auc") in found:
            used = {name: found[(name, "iqm_normalized_auc")]["seeds"] for name in (variant, baseline)}
            each = (f"{used[variant]} seed{'s' * (used[variant] > 1)} each" if used[variant] == used[baseline] else
                    f"{variant} {used[variant]} seeds each, {baseline} {used[baseline]}")
            lines += ["", f"IQM of the baseline-normalized AUC over {found[(variant, 'iqm_normalized_auc')]['games']} games, "
                      f"{each}: "
                      f"{variant} {estimate(variant, 'iqm_normalized_auc', '.2f')}, {baseline} "
                      f"{estimate(baseline, 'iqm_normalized_auc', '.2f')}; probability of improvement "
                      f"{estimate(variant, 'probability_of_improvement', '.2f')}."]
        counts = []
        for name, what in (("relative_action_gap_increase", "relative action gap larger"),
                           ("overestimation_decrease_pct", "overestimation smaller")):
            have = [c for c in pair if c[name] is not None]
            above = [c for c in have if c[f"{name}_ci_low"] is not None]
            counts.append(f"{what} on {sum(c[name] > 0 for c in have)} of {len(have)} games" +
                          (f", its interval above 0 on {sum(c[f'{name}_ci_low'] > 0 for c in above)} and below 0 on "
                           f"{sum(c[f'{name}_ci_high'] < 0 for c in above)} of the {len(above)} with one" if above else ""))
        lines += ["", f"{variant} against {baseline}: " + "; ".join(counts) + "."]
        lines.append("")
    return lines


def minatar_sections(variants: dict, all_games: list, args: Args) -> tuple:
    """The MinAtar runs' tables, figures and report lines: (report lines, figures, what is missing)."""
    per_game, aucs, notes = minatar_per_game(variants)
    write_csv(os.path.join(args.out_dir, "minatar_per_game.csv"), per_game, MINATAR_GAME_COLUMNS)
    aggregate, aggregate_notes = minatar_aggregate(variants, aucs, args)
    write_csv(os.path.join(args.out_dir, "minatar_aggregate.csv"), aggregate, MINATAR_AGGREGATE_COLUMNS)
    claims = claim_rows(variants, args.reps, args.seed)
    write_csv(os.path.join(args.out_dir, "minatar_claims.csv"), claims, CLAIM_COLUMNS)
    figures = []
    plot_minatar_curves(variants, os.path.join(args.out_dir, "minatar_curves.png"))
    figures.append(("minatar_curves.png", "MinAtar: evaluation score per game vs agent steps, mean over seeds with its "
                    "95% interval (1.96 standard errors), on the steps every seed has reached."))
    if aggregate:
        plot_minatar_aggregate(aggregate, aucs, os.path.join(args.out_dir, "minatar_aggregate.png"))
        figures.append(("minatar_aggregate.png", "MinAtar: IQM over games and seeds of the AUC divided by the baseline's "
                        "mean AUC on the game, 95% stratified bootstrap interval (table: minatar_aggregate.csv)."))
    figures += claim_figures(claims, args.out_dir, "minatar_")
    cells = [{"variant": r["variant"], "game": r["game"], "seeds": r["n_seeds"],
              "AUC (95% interval)": f"{r['auc']:.2f} ± {r['auc_ci']:.2f}",
              "evaluations": f"{r['points']} to {r['last_step']:,}",
              "final score (95% interval)": f"{r['final_mean']:.2f} ± {r['final_ci']:.2f} ({r['finished']} finished)"}
             for r in per_game]
    lines = ["## MinAtar", "", "### Summary", "", *minatar_summary(per_game, aggregate, claims),
             "AUC: per seed, the mean of its evaluation scores over the evaluation steps all the seeds of its game and "
             "variant have; per game, the mean over seeds (the authors' AUC, plotting/plot_hypers_perf.py), ± 1.96 standard "
             "errors over seeds. Final score: the best network's final evaluation. Every number: `minatar_per_game.csv`.", "",
             markdown_table(cells, list(cells[0])) if cells else "No evaluation yet.", "",
             "### Aggregate: IQM of the baseline-normalized AUC", "",
             "Normalization: each seed's AUC divided by the baseline's mean AUC on the same game over the seeds the "
             "aggregate uses (the baseline's is 1 on every game). IQM over the (seeds x games) matrix with 95% "
             f"stratified bootstrap intervals ({args.reps} resamples), and the probability that the variant's AUC beats the baseline's on a game (rliable).",
             "", markdown_table(aggregate, MINATAR_AGGREGATE_COLUMNS) if aggregate else "No game has both sides yet.", ""]
    lines += claims_report(claims, "### Claims 2 and 3 on MinAtar (the authors' computation)", "minatar_claims.csv")
    missing = missing_data(variants, all_games, {}, {}, []) + notes + aggregate_notes
    return lines, figures, missing


def write_records(runs: list, records_dir: str) -> list:
    """--records-dir: each finished run's record (config.json, final_eval.json and curves.json) in records_dir/NAME, and a
    part file naming the runs this call added, with their CPU models. Returns the names added."""
    added = []
    for run in runs:
        name = os.path.basename(os.path.normpath(run.path))
        target = os.path.join(records_dir, name)
        if run.final is None or os.path.abspath(target) == os.path.abspath(run.path):
            continue
        new = not os.path.exists(os.path.join(target, "final_eval.json"))
        os.makedirs(target, exist_ok=True)
        for file in ("config.json", "final_eval.json"):
            shutil.copyfile(os.path.join(run.path, file), os.path.join(target, file))
        curves = {tag: [[int(s), float(v)] for s, v in zip(*run.curves[tag])] for tag in CURVE_TAGS if len(run.curves[tag][0])}
        with open(os.path.join(target, RECORD_CURVES), "w") as f:
            json.dump({"last_step": run.last_step, "wall_seconds": run.wall_seconds, "curves": curves}, f)
        if new:
            added.append(name)
    if added:
        configs = {name: json.load(open(os.path.join(records_dir, name, "config.json"))) for name in added}
        wall = {os.path.basename(os.path.normpath(r.path)): r.wall_seconds for r in runs}
        part = {"date": f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}",
                "machines": sorted({c.get("machine", "not recorded") for c in configs.values()}),
                "runs": {name: {"machine": c.get("machine", "not recorded"), "code": c.get("code"), "command": c.get("command"),
                                "wall_seconds": wall[name]}
                         for name, c in configs.items()}}
        os.makedirs(os.path.join(records_dir, "_parts"), exist_ok=True)
        with open(os.path.join(records_dir, "_parts", f"{datetime.datetime.now():%Y%m%d-%H%M%S}.json"), "w") as f:
            json.dump(part, f, indent=1)
    return added


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
    for name, runs in variants.items():
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
            if run_claims(run)["relative_action_gap"] is None:
                lines.append(f"{name}, {run.game}, seed {run.seed}: no relative action gap (no claims/ point: a run older "
                             f"than the statistic, or no evaluation yet): left out of the claims section ({run.path})")
        lines += [f"{name}, final-score aggregate: {note}" for note in aggregate_notes.get(name, [])]
        lines += [f"{name}, IQM curve: {note}" for note in curve_notes.get(name, [])]
    lines += [f"{run.path}: {note}" for runs in variants.values() for run in runs for note in run.damaged]
    return lines + problems


def significant(value) -> str:
    return "missing" if value is None else f"{value:.4g}"


def with_interval(row: dict, name: str, form: str = ".4g", missing: str = "missing") -> str:
    """A claim number and, where it has one, its 95% interval over seeds."""
    value, low, high = row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"]
    if value is None:
        return missing
    return format(value, form) + (f" ({low:{form}} to {high:{form}})" if low is not None else "")


def claims_report(rows: list, title: str = "## Claims 2 and 3: relative action gap and overestimation (the authors' "
                  "computation)", table: str = "claims.csv") -> list:
    """report.md's section on claims 2 and 3, computed as the authors compute them, one table per comparison."""
    lines = [title, "",
             "As the authors' plotting/two_alg_aux.py: per run, the mean over all its evaluation rows of the relative action "
             "gap (`claims/relative_action_gap`: the gap measured at target syncs / (|mean training-batch Q| + 1e-8)) and "
             "of the evaluation's overestimation (`eval/overestimation`); per game, the mean over seeds. Increase: variant - "
             "baseline (unclipped; the authors' figure clips it to "
             f"{AUTHORS_GAP_CLIP}). % decrease in overestimation: -(variant - baseline) / (|baseline| + 1e-8) x 100. "
             "In brackets (ours; the authors give none), from 2 runs a side: the 95% percentile bootstrap interval over "
             "seeds, each side's runs resampled on their own. "
             f"`missing`: no run of that side has the statistic (runs older than it). Every number: `{table}`.", ""]
    if not rows:
        return lines + ["No game has runs of a mean-expansion variant and its baseline: nothing to compare.", ""]
    for variant, baseline in dict.fromkeys((r["variant"], r["baseline"]) for r in rows):
        pair = [r for r in rows if (r["variant"], r["baseline"]) == (variant, baseline)]
        gaps = [r["relative_action_gap_increase"] for r in pair if r["relative_action_gap_increase"] is not None]
        over = [r["overestimation_decrease_pct"] for r in pair if r["overestimation_decrease_pct"] is not None]
        summary = []
        if gaps:
            summary.append(f"relative action gap larger on {sum(g > 0 for g in gaps)} of {len(gaps)} games (median increase "
                           f"{np.median(gaps):.4g})")
        if over:
            summary.append(f"overestimation smaller on {sum(o > 0 for o in over)} of {len(over)} games (median decrease "
                           f"{np.median(over):.3g}%)")
        cells = [{"game": r["game"], "gap, variant": significant(r["variant_relative_action_gap"]),
                  "gap, baseline": significant(r["baseline_relative_action_gap"]),
                  "gap increase": with_interval(r, "relative_action_gap_increase"),
                  "overestimation, variant": significant(r["variant_overestimation"]),
                  "overestimation, baseline": significant(r["baseline_overestimation"]),
                  "% decrease": with_interval(r, "overestimation_decrease_pct")} for r in pair]
        lines += [f"{title.split()[0]}# {variant} vs {baseline}", "",
                  ("; ".join(summary) or "no game has both statistics on both sides") + ".",
                  "", markdown_table(cells, list(cells[0])), ""]
    return lines


def k_column(k: str) -> str:
    """The header of k's column in report.md: markdown_table escapes the cells, not the headers (k = |A|)."""
    return f"k = {k}".replace("|", "\\|")


def k_sensitivity_report(rows: list, notes: list) -> list:
    """report.md's section on the k sweeps: per algorithm and settings a table of games x k of "AUC (seeds)", the
    evaluation steps the AUCs use, and what was left out."""
    lines = ["## k sensitivity (the authors' k figure)", "",
             "AUC: for one game and k, the human-normalized evaluation score of each seed, averaged over the seeds at each "
             "evaluation step, then over the evaluation steps all of them have, as the authors' plotting/plot_hypers_perf.py "
             "computes it. Games with runs at two or more k of the same algorithm, network, optimizer and loss; figure "
             "`k_sensitivity.png`; every number, with the standard error over seeds of each seed's AUC: "
             "`k_sensitivity.csv`.", ""]
    if not rows:
        return lines + ["No game has runs at two or more k with the same algorithm, network, optimizer and loss: "
                        "no figure.", ""]
    for sweep in sorted({sweep_of(r) for r in rows}):
        sweep_rows = [r for r in rows if sweep_of(r) == sweep]
        columns = ["game"] + [k_column(k) for _, k in sorted({(r["me_coef"], r["k"]) for r in sweep_rows})]
        table = collections.defaultdict(dict)
        for r in sweep_rows:
            table[r["game"]][k_column(r["k"])] = f"{r['auc']:.3f} ({r['n_seeds']} seed{'s' if r['n_seeds'] > 1 else ''})"
        cells = [{c: table[game].get(c, "") for c in columns} | {"game": game} for game in table]
        lines += [f"### {settings_label(*sweep)}", "", markdown_table(cells, columns), ""]
    spans = sorted({(r["first_step"], r["last_step"], r["points"]) for r in rows})
    if len(spans) == 1:
        lines += ["Every AUC uses the evaluation steps {:,} to {:,} ({} points).".format(*spans[0]), ""]
    else:
        lines += ["The AUCs use different evaluation steps (`first_step`, `last_step`, `points` in `k_sensitivity.csv`).", ""]
    return lines + [f"- {note}" for note in notes] + ([""] if notes else [])


def drop_duplicates(runs: list):
    """One run per (variant, game, seed): the one that got furthest. Returns (runs kept, the others as sentences)."""
    groups = collections.defaultdict(list)
    for run in runs:
        groups[(run.variant, run.game, run.seed)].append(run)
    kept, notes = [], []
    for group in groups.values():
        group.sort(key=lambda r: (r.final is not None, r.last_step, r.path), reverse=True)
        kept.append(group[0])
        notes += [f"{other.path}: the same variant, game and seed as {group[0].path}, which got further "
                  "(runs of different protocols belong in different --runs-dir folders)" for other in group[1:]]
    return sorted(kept, key=lambda r: r.path), notes


def write_csv(path: str, rows: list, columns: list):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def count(n: int, word: str) -> str:
    """'1 run', '2 runs'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


GAME_COLUMNS = ["variant", "algo", "me_coef", "game", "seeds", "n_seeds", "mean", "std", "human_normalized", "random_score",
                "human_score", *OVERESTIMATION]
AGGREGATE_COLUMNS = ["variant", "algo", "me_coef", "metric", "value", "ci_low", "ci_high", "games", "seeds"]
OVERESTIMATION_COLUMNS = ["variant", "statistic", "median_over_games", "mean_over_games", "games"]
CLAIM_COLUMNS = ["variant", "baseline", "game", "variant_relative_action_gap", "baseline_relative_action_gap",
                 "relative_action_gap_increase", "relative_action_gap_increase_ci_low", "relative_action_gap_increase_ci_high",
                 "variant_overestimation", "baseline_overestimation", "overestimation_decrease_pct",
                 "overestimation_decrease_pct_ci_low", "overestimation_decrease_pct_ci_high", "variant_relative_action_gap_runs",
                 "baseline_relative_action_gap_runs", "variant_overestimation_runs", "baseline_overestimation_runs"]
MINATAR_GAME_COLUMNS = ["variant", "me_coef", "game", "seeds", "n_seeds", "points", "last_step", "auc", "auc_ci", "final_mean",
                        "final_ci", "finished"]
MINATAR_AGGREGATE_COLUMNS = ["comparison", "variant", "metric", "value", "ci_low", "ci_high", "games", "seeds"]
K_SENSITIVITY_COLUMNS = ["algo", "network", "optimizer", "loss", "game", "k", "me_coef", "seeds", "n_seeds", "points",
                         "first_step", "last_step", "longest_step", "auc", "seed_auc_se"]


def atari_sections(variants: dict, runs: list, game_scores: dict, problems: list, args: Args) -> tuple:
    """The Atari runs' tables, figures and report lines: (report lines, figures, what is missing)."""
    per_game = per_game_rows(variants, game_scores)
    write_csv(os.path.join(args.out_dir, "per_game.csv"), per_game, GAME_COLUMNS)
    aggregates, aggregate_notes = aggregate_rows(variants, game_scores, args)
    write_csv(os.path.join(args.out_dir, "aggregate.csv"), aggregates, AGGREGATE_COLUMNS)
    overestimation = overestimation_rows(per_game)
    write_csv(os.path.join(args.out_dir, "overestimation.csv"), overestimation, OVERESTIMATION_COLUMNS)
    claims = claim_rows(variants, args.reps, args.seed)
    write_csv(os.path.join(args.out_dir, "claims.csv"), claims, CLAIM_COLUMNS)
    sweeps, sweep_notes = k_sensitivity(runs, game_scores)
    write_csv(os.path.join(args.out_dir, "k_sensitivity.csv"), sweeps, K_SENSITIVITY_COLUMNS)

    figures = []  # (file, caption)
    curves, curve_notes = {}, {}
    for variant, variant_runs in variants.items():
        curve, curve_notes[variant] = aggregate_curve(variant_runs, game_scores, args)
        if curve is not None:
            curves[variant] = curve
    if curves:
        plot_aggregate(curves, variants, os.path.join(args.out_dir, "aggregate_iqm.png"))
        figures.append(("aggregate_iqm.png", "IQM human-normalized evaluation score vs agent steps, 95% stratified bootstrap CI. "
                        + " ".join(f"{v}: {c[4]}." for v, c in curves.items())))
    plot_per_game(variants, os.path.join(args.out_dir, "per_game_curves.png"))
    figures.append(("per_game_curves.png", "Evaluation score (raw game score) of every game vs agent steps."))
    plot_across_games(variants, "metrics/action_gap", "action gap (largest Q - second largest Q)",
                      os.path.join(args.out_dir, "action_gap.png"))
    figures.append(("action_gap.png", "Our absolute action gap (every training batch) vs agent steps; the authors' relative "
                    "gap for claim 2 is in the claims section and its figures."))
    plot_across_games(variants, "eval/overestimation", "overestimation (predicted Q - discounted return)",
                      os.path.join(args.out_dir, "overestimation.png"))
    figures.append(("overestimation.png", "Overestimation on evaluation episodes vs agent steps (claim 3: less with mean-expansion)."))
    plot_across_games(variants, "eval/normalized_overestimation", "normalized overestimation (/ |mean Q|)",
                      os.path.join(args.out_dir, "normalized_overestimation.png"))
    figures.append(("normalized_overestimation.png", "Normalized overestimation on evaluation episodes vs agent steps: "
                    "the overestimation of each episode divided by the absolute value of its mean Q."))
    if plot_final_overestimation(per_game, os.path.join(args.out_dir, "overestimation_final.png")):
        figures.append(("overestimation_final.png", "The final evaluation's overestimation and normalized overestimation per "
                        "variant: the spread over games of each game's mean over seeds (table: overestimation.csv)."))
    finals = {(r["variant"], r["game"]): r["mean"] for r in per_game}
    for variant, baseline in comparisons(variants):
        changes = {g: relative_change(finals[(variant, g)], finals[(baseline, g)], *game_scores[g])
                   for (v, g) in finals if v == variant and (baseline, g) in finals}
        if changes:
            name = f"relative_change_{slug(variant)}_vs_{slug(baseline)}.png"
            plot_relative_change(changes, variant, baseline, os.path.join(args.out_dir, name))
            figures.append((name, f"Per game, {variant} against {baseline} on the final evaluation ({count(len(changes), 'game')} with both)."))
    figures += claim_figures(claims, args.out_dir)
    if sweeps:
        plot_k_sensitivity(sweeps, os.path.join(args.out_dir, "k_sensitivity.png"))
        figures.append(("k_sensitivity.png", "The authors' k figure: per game, the AUC of the human-normalized evaluation "
                        "score against k > 0 (log scale); dashed, in the game's colour, its AUC at k = 0 "
                        "(table: k_sensitivity.csv)."))

    report = [
        "## Aggregate human-normalized scores (final evaluation)",
        "",
        "Human-normalized score: (score - random) / (human - random), from `atari57.csv` with "
        f"{SCORE_TABLES[args.score_table][1]} (`--score-table {args.score_table}`), in every table and figure. "
        "IQM, median, mean and "
        "optimality gap over the matrix of runs (seeds x games), with 95% stratified bootstrap confidence intervals "
        f"({args.reps} resamples; rliable). `games` and `seeds` say what each row rests on. The probability of improvement of "
        "\"A vs B\" is P(A > B) on a game, averaged over the games both have.",
        "",
        markdown_table(aggregates, AGGREGATE_COLUMNS) if aggregates else "No finished run yet: no final scores.",
        "",
        "## Overestimation (final evaluation)",
        "",
        "The authors' measure, per evaluation episode: the mean over its steps of Q(s_t, a_t) - G_t, with G_t the discounted "
        "return of sign-clipped rewards (bootstrapped where the episode was cut); normalized: divided by |mean Q| of the "
        "episode. Each game: the mean over its seeds; here the median and mean over games.",
        "",
        markdown_table(overestimation, OVERESTIMATION_COLUMNS) if overestimation else "No finished run measured it yet.",
        "",
        *claims_report(claims),
        *k_sensitivity_report(sweeps, sweep_notes),
        "## Per-game final scores",
        "",
        markdown_table(per_game, GAME_COLUMNS) if per_game else "None yet.",
        "",
    ]
    return report, figures, missing_data(variants, sorted(game_scores), aggregate_notes, curve_notes, problems)


def by_variant(runs: list) -> dict:
    """{variant name: its runs}, in the paper's order."""
    variants = {}
    for run in sorted(runs, key=lambda r: variant_order(r.variant)):
        variants.setdefault(run.variant, []).append(run)
    return variants


def main(args: Args):
    if not os.path.isdir(args.runs_dir):
        fail(f"--runs-dir {args.runs_dir!r} does not exist")
    for name in ("games_csv", "minatar_csv"):
        if not os.path.isfile(getattr(args, name)):
            fail(f"--{name.replace('_', '-')} {getattr(args, name)!r} does not exist")
    for name in ("out_dir", "records_dir"):
        folder = getattr(args, name)
        writable = folder is None or not os.path.exists(folder) or (os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK))
        if not writable:
            fail(f"--{name.replace('_', '-')} {folder!r} is not a folder this user can write into (checked before reading the runs)")
    for name in ("reps", "curve_reps", "curve_points", "workers"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    try:
        env_games, game_scores = read_games(args.games_csv, args.score_table)
    except KeyError as error:
        fail(f"--games-csv {args.games_csv!r} has no column {error.args[0]!r} (--score-table {args.score_table} reads it)")
    try:
        minatar_games = read_minatar_games(args.minatar_csv)
    except KeyError as error:
        fail(f"--minatar-csv {args.minatar_csv!r} has no column {error.args[0]!r} (it needs game and env_id)")
    runs, problems = find_runs(args.runs_dir, args.workers)
    for run in list(runs):
        run.game = env_games.get(run.env_id, minatar_games.get(run.env_id, ""))
        if not run.game:
            problems.append(f"{run.path}: env {run.env_id} is not a game of {args.games_csv} or {args.minatar_csv}")
            runs.remove(run)
    if not runs:
        fail(f"no run found under {args.runs_dir!r} (a run is a directory with the config.json the scripts write)"
             + (": " + "; ".join(problems) if problems else ""))
    runs, duplicates = drop_duplicates(runs)
    problems = [f"not read: {p}" for p in problems] + [f"left out: {d}" for d in duplicates]
    os.makedirs(args.out_dir, exist_ok=True)
    if args.records_dir is not None:
        added = write_records(runs, args.records_dir)
        kept = sum(r.final is not None for r in runs)
        print(f"{count(len(added), 'new record')} in {args.records_dir} ({kept} finished runs kept)")
    minatar = set(minatar_games.values())
    atari_runs = [r for r in runs if r.game not in minatar]
    variants = by_variant(runs)
    report, figures, missing = [], [], []
    if atari_runs:
        report, figures, missing = atari_sections(by_variant(atari_runs), atari_runs, game_scores, problems, args)
    else:
        missing = problems
    if len(atari_runs) < len(runs):
        lines, more_figures, more_missing = minatar_sections(by_variant([r for r in runs if r.game in minatar]),
                                                             sorted(minatar), args)
        report, figures, missing = report + lines, figures + more_figures, missing + more_missing

    summary = [dict(variant=v, algo=rs[0].algo, me_coef=rs[0].k, games=len({r.game for r in rs}),
                    seeds=" ".join(map(str, sorted({r.seed for r in rs}))), finished=sum(r.final is not None for r in rs),
                    unfinished=sum(r.final is None for r in rs)) for v, rs in variants.items()]
    report = [
        "# Results",
        "",
        f"Written by `plot_results.py` on {datetime.datetime.now():%Y-%m-%d %H:%M} from `{args.runs_dir}`: {len(runs)} runs "
        f"read ({sum(r.final is not None for r in runs)} finished).",
        "",
        "## Runs",
        "",
        markdown_table(summary, ["variant", "algo", "me_coef", "games", "seeds", "finished", "unfinished"]),
        "",
        *report,
        "## Figures",
        "",
    ]
    for name, caption in figures:
        report += [f"![{name}]({name})", "", caption, ""]
    report += ["## What is missing", ""]
    report += [f"- {line}" for line in missing] or ["Nothing: every variant has every game and seed, all finished."]
    with open(os.path.join(args.out_dir, "report.md"), "w") as f:
        f.write("\n".join(report) + "\n")
    print(f"{count(len(runs), 'run')} in {count(len(variants), 'variant')} -> {args.out_dir}/report.md "
          f"({count(len(missing), 'gap')} listed there)")


if __name__ == "__main__":
    main(tyro.cli(Args))
