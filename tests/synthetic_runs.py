"""Run directories like the scripts write (config.json, TensorBoard events, final_eval.json), with known values.

    python tests/synthetic_runs.py DIR   # a demo batch in DIR/runs: 8 games x DQN/IQN x k in {0, |A|} x 3 seeds

The demo feeds README's example figures: python plot_results.py --runs-dir DIR/runs --out-dir DIR/results, then
docs/example_aggregate_iqm.png and docs/example_action_gap.png are copies of DIR/results/aggregate_iqm.png and action_gap.png
"""

import json
import os
import sys

import numpy as np
from torch.utils.tensorboard import SummaryWriter  # the writer the scripts log with

EVAL_INTERVAL = 250_000


ROW_SETTINGS = {"dqn": dict(network="nature", optimizer="adam", loss="sse"),
                "iqn": dict(network="iqn", optimizer="adam", loss="quantile_huber")}  # what the scripts record by default


def write_run(root, name, algo, env_id, seed, me_coef=None, final_mean=None, eval_returns=(), action_gaps=(),
              overestimations=(), eval_interval=EVAL_INTERVAL, final_overestimation=None, normalized_overestimations=(),
              relative_action_gaps=(), **settings):
    """One run directory. me_coef None is the scripts' default k (|A| = 18; 0 for --network dueling and rdq);
    eval_returns etc. are (step, value) pairs; settings: network, optimizer, loss where not the algorithm's defaults."""
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    settings = {**ROW_SETTINGS[algo], **settings}
    default_k = 18.0 if settings["network"] in ("nature", "iqn") else 0.0
    config = {"algo": algo, "env_id": env_id, "seed": seed, "me_coef": default_k if me_coef is None else float(me_coef),
              "me_coef_default": me_coef is None, "eval_interval": eval_interval, "run_name": name, **settings}
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f)
    writer = SummaryWriter(run_dir)
    for tag, points in (("eval/episodic_return", eval_returns), ("metrics/action_gap", action_gaps),
                        ("eval/overestimation", overestimations), ("eval/normalized_overestimation", normalized_overestimations),
                        ("claims/relative_action_gap", relative_action_gaps)):
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()
    if final_mean is not None:
        last = int(max([s for s, _ in eval_returns] + [0]))
        with open(os.path.join(run_dir, "final_eval.json"), "w") as f:
            json.dump({"algo": algo, "env_id": env_id, "seed": seed, "me_coef": config["me_coef"], "total_steps": last,
                       "scores": [final_mean] * 3, "mean": final_mean, "episodes": 3, "overestimation": final_overestimation,
                       "normalized_overestimation": None if final_overestimation is None else final_overestimation / 10,
                       "mean_q": None if final_overestimation is None else 10.0}, f)
    return run_dir


DEMO_GAMES = {  # game: (env id, random score, human score), as in atari57.csv
    "breakout": ("ALE/Breakout-v5", 1.7, 30.5), "pong": ("ALE/Pong-v5", -20.7, 14.6),
    "seaquest": ("ALE/Seaquest-v5", 68.4, 42054.7), "qbert": ("ALE/Qbert-v5", 163.9, 13455.0),
    "space_invaders": ("ALE/SpaceInvaders-v5", 148.0, 1668.7), "beam_rider": ("ALE/BeamRider-v5", 363.9, 16926.5),
    "enduro": ("ALE/Enduro-v5", 0.0, 860.5), "ms_pacman": ("ALE/MsPacman-v5", 307.3, 6951.6),
}


def make_demo(root, steps=10_000_000, seeds=(1, 2, 3)):
    """A plausible batch: mean-expansion learns faster, with larger action gaps and less overestimation."""
    rng = np.random.default_rng(0)
    grid = [int(s) for s in np.arange(EVAL_INTERVAL, steps + 1, EVAL_INTERVAL)]
    for g, (game, (env_id, random_score, human_score)) in enumerate(DEMO_GAMES.items()):
        skill = 0.3 + 1.7 * g / len(DEMO_GAMES)  # final human-normalized score of the baseline
        for algo, algo_gain in (("dqn", 1.0), ("iqn", 1.3)):
            for me_coef, me_gain in ((0, 1.0), (None, 1.35)):
                for seed in seeds:
                    final = skill * algo_gain * me_gain * np.exp(rng.normal(0, 0.15))
                    hns = final * (1 - np.exp(-4 * np.array(grid) / steps * me_gain)) + rng.normal(0, 0.03, len(grid))
                    score = random_score + hns * (human_score - random_score)
                    variant = algo if me_coef == 0 else f"ib_{algo}"  # run_all.sh's names
                    gaps = [(s, 0.02 * me_gain ** 2 * (1 + s / steps) + rng.normal(0, 0.002)) for s in grid]
                    over = [(s, 0.8 / me_gain ** 3 * (1 - s / steps / 2) + rng.normal(0, 0.05)) for s in grid]
                    write_run(root, f"{game}__{variant}__s{seed}", algo, env_id, seed, me_coef,
                              final_mean=float(score[-1]), eval_returns=list(zip(grid, score)), action_gaps=gaps,
                              overestimations=over, normalized_overestimations=[(s, v / 10) for s, v in over],
                              relative_action_gaps=[(s, v / 5) for s, v in gaps],
                              final_overestimation=float(over[-1][1]))


if __name__ == "__main__":
    make_demo(os.path.join(sys.argv[1], "runs"))
