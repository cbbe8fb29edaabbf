"""--eval-model: a saved network plays its run's final evaluation again, and bad models are refused."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

TINY = ["--env-id", "ALE/Pong-v5", "--total-timesteps", "400", "--learning-starts", "200", "--buffer-size", "1000",
        "--batch-size", "8", "--eval-interval", "0", "--final-eval-episodes", "2", "--max-episode-steps", "150",
        "--log-interval", "100", "--no-cuda", "--save-model"]


def run(algo, cwd, *flags, code=0):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, f"{algo}_atari_meanexp.py"), *flags], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == code, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("eval")
    run("dqn", cwd, *TINY, "--seed", "3", "--run-name", "d")
    return cwd


def test_eval_model_reproduces_the_runs_final_evaluation_exactly(trained):
    proc = run("dqn", trained, "--eval-model", "runs/d/dqn_atari_meanexp.cleanrl_model")
    final = json.loads((trained / "runs/d/final_eval.json").read_text())
    again = json.loads((trained / "runs/d/dqn_atari_meanexp_eval_seed3.json").read_text())  # the run's seed, from config.json
    keys = ("scores", "lengths", "mean", "overestimation", "normalized_overestimation", "mean_q", "truncated_episodes")
    assert {k: again[k] for k in keys} == {k: final[k] for k in keys} and again["episodes"] == 2
    assert "evaluation of runs/d/dqn_atari_meanexp.cleanrl_model" in proc.stdout
    over = "n/a (no episode finished)" if final["overestimation"] is None else f"{final['overestimation']:.3f}"
    assert f"overestimation {over} -> " in proc.stdout  # rounded, as the run's own lines (issue 34)
    refused = run("dqn", trained, "--eval-model", "runs/d/dqn_atari_meanexp.cleanrl_model", code=2)  # nothing overwritten
    assert "exists (this model, this seed)" in refused.stderr
    more = run("dqn", trained, "--eval-model", "runs/d/dqn_atari_meanexp.cleanrl_model", "--seed", "4",
               "--final-eval-episodes", "3")  # flags given override the run's settings
    assert json.loads((trained / "runs/d/dqn_atari_meanexp_eval_seed4.json").read_text())["episodes"] == 3, more.stdout


def test_bad_models_are_refused_with_a_clear_message(trained):
    missing = run("dqn", trained, "--eval-model", "runs/d/nothing.cleanrl_model", code=2)
    assert "no such file" in missing.stderr
    other = run("iqn", trained, "--eval-model", "runs/d/dqn_atari_meanexp.cleanrl_model", code=2)
    assert "is a model of dqn_atari_meanexp.py: evaluate it with that script" in other.stderr
    os.makedirs(trained / "loose", exist_ok=True)  # without config.json: the flags decide, and the model must fit them
    model = torch.load(trained / "runs/d/dqn_atari_meanexp.cleanrl_model")
    torch.save(model, trained / "loose/m.cleanrl_model")
    actions = run("dqn", trained, "--eval-model", "loose/m.cleanrl_model", "--env-id", "ALE/Pong-v5", "--no-full-action-space",
                  "--me-coef", "0", code=2)
    assert "does not fit ALE/Pong-v5 with 6 actions" in actions.stderr
    network = run("dqn", trained, "--eval-model", "loose/m.cleanrl_model", "--env-id", "ALE/Pong-v5", "--network", "dueling",
                  code=2)
    assert "is not a network dqn_atari_meanexp.py saves with these settings" in network.stderr
    assert not any(p.name.endswith(".json") for p in (trained / "loose").iterdir())


def test_eval_model_videos_hold_whole_games(trained):
    run("dqn", trained, "--eval-model", "runs/d/dqn_atari_meanexp.cleanrl_model", "--seed", "5", "--capture-video")
    # RecordVideo's schedule records games 1, 8, 27, ...; the reset that seeds the env plays no game and leaves no clip
    assert sorted(os.listdir(trained / "runs/d/videos")) == ["rl-video-episode-1.mp4"]


def test_without_periodic_evaluations_no_best_network_is_saved_and_both_say_why(tmp_path):
    """--save-model writes the best network only where there were periodic evaluations; the run and --eval-model of
    the missing file both say so (issue 34: the documented command failed without a reason)."""
    flags = [f for f in TINY if f != "--save-model"]
    trained = run("dqn", tmp_path, *flags, "--save-model", "--eval-interval", "0", "--run-name", "once")
    assert "no periodic evaluation (--eval-interval 0): no dqn_atari_meanexp_best.cleanrl_model" in trained.stdout
    assert sorted(p for p in os.listdir(tmp_path / "runs" / "once") if p.endswith(".cleanrl_model")) == [
        "dqn_atari_meanexp.cleanrl_model"]
    refused = run("dqn", tmp_path, "--eval-model", "runs/once/dqn_atari_meanexp_best.cleanrl_model", code=2)
    assert "only where the run had periodic evaluations" in refused.stderr
