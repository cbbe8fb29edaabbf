"""The script on real ALE games, on CPU, with tiny settings: what a user gets on disk."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT

TAGS = ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/epsilon", "losses/td_loss",
        "losses/q_values", "metrics/action_gap", "eval/episodic_return", "eval/overestimation"]
TINY = ["--total-timesteps", "600", "--learning-starts", "200", "--buffer-size", "1000", "--batch-size", "8",
        "--eval-interval", "300", "--eval-steps", "130", "--final-eval-episodes", "3", "--max-episode-steps", "120",
        "--log-interval", "100", "--target-network-frequency", "100", "--no-cuda"]


def run_script(script, cwd, *flags):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def scalars(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def check_final_eval(run_dir, episodes, **expected):
    final = json.loads((run_dir / "final_eval.json").read_text())
    for key, value in expected.items():
        assert final[key] == value, key
    assert len(final["scores"]) == len(final["lengths"]) == final["episodes"] == episodes
    assert final["mean"] == pytest.approx(np.mean(final["scores"]))
    assert final["median"] == pytest.approx(np.median(final["scores"]))
    assert final["std"] == pytest.approx(np.std(final["scores"], ddof=1))  # as the authors' statistics.stdev
    assert all(0 < n <= 120 for n in final["lengths"])
    return final


SMALL_IQN = ["--num-tau-samples", "8", "--num-tau-prime-samples", "8", "--num-quantile-samples", "8"]  # CPU-sized


@pytest.mark.parametrize("algo,extra", [("dqn", []), ("iqn", SMALL_IQN)])
def test_paper_protocol_run_writes_every_tag_and_final_eval(tmp_path, algo, extra):
    proc = run_script(f"{algo}_atari_meanexp.py", tmp_path, "--env-id", "ALE/Pong-v5", "--run-name", "pong", "--seed", "5",
                      *TINY, *extra)
    run_dir = tmp_path / "runs" / "pong"
    assert "SPS" in proc.stdout and "ETA" in proc.stdout  # console progress
    acc = scalars(run_dir)
    assert set(TAGS) <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("eval/episodic_return")] == [300, 600]
    assert acc.Scalars("charts/updates")[-1].value == (600 - 200) // 4
    epsilons = [e.value for e in acc.Scalars("charts/epsilon")]
    assert epsilons == sorted(epsilons, reverse=True) and epsilons[0] < 1.0
    text = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    for setting in ["|sticky_action_prob|0.25|", "|n_actions|18|", "|me_coef|18.0|", "|life_loss|does not end the episode|"]:
        assert setting in text
    config = json.loads((run_dir / "config.json").read_text())
    assert config["algo"] == algo and config["me_coef"] == 18.0 and config["full_action_space"] is True
    assert config["run_name"] == "pong" and config["noop_max"] == 0  # the authors' code has no no-op starts
    row = {"dqn": ("sse", "adam", "nature", 6.25e-5, 1.5e-4), "iqn": ("quantile_huber", "adam", "iqn", 5e-5, 0.01 / 32)}[algo]
    assert tuple(config[k] for k in ("loss", "optimizer", "network", "learning_rate", "optimizer_eps")) == row
    assert {"eval/normalized_overestimation", "eval/mean_q", "eval/mean_return", "eval/mean_discounted_return",
            "eval/truncated_episodes"} <= set(acc.Tags()["scalars"])
    final = check_final_eval(run_dir, 3, algo=algo, env_id="ALE/Pong-v5", seed=5, me_coef=18.0, total_steps=600)
    assert final["truncated_episodes"] == 3  # Pong lasts longer than 120 steps: every episode is cut, and bootstrapped
    assert all(isinstance(final[key], float) for key in ("overestimation", "normalized_overestimation", "mean_q",
                                                         "mean_return", "mean_discounted_return"))


def test_cleanrl_protocol_with_two_envs_video_and_model(tmp_path):
    """CleanRL's settings (no sticky actions, minimal action set, life loss ends the episode), k = 0,
    two envs stepped in parallel: the updates per agent step stay 1/train_frequency."""
    flags = ["--env-id", "BreakoutNoFrameskip-v4", "--sticky-action-prob", "0", "--no-full-action-space",
             "--episodic-life", "--fire-reset", "--me-coef", "0", "--num-envs", "2", "--run-name", "breakout",
             "--save-model", "--capture-video", *TINY]
    run_script("dqn_atari_meanexp.py", tmp_path, *flags)
    run_dir = tmp_path / "runs" / "breakout"
    acc = scalars(run_dir)
    assert set(TAGS) - {"eval/episodic_return", "eval/overestimation"} <= set(acc.Tags()["scalars"])
    last = acc.Scalars("charts/updates")[-1]
    assert last.value == (last.step - 200) // 4
    config = json.loads((run_dir / "config.json").read_text())
    assert config["n_actions"] == 4 and config["me_coef"] == 0.0 and config["episodic_life"] is True
    check_final_eval(run_dir, 3, algo="dqn", env_id="BreakoutNoFrameskip-v4", me_coef=0.0)
    assert (run_dir / "dqn_atari_meanexp.cleanrl_model").stat().st_size > 1_000_000
    assert (run_dir / "dqn_atari_meanexp_best.cleanrl_model").exists()
    assert list((run_dir / "videos").glob("*.mp4"))
