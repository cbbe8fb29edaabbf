"""--track: Weights & Biases for real (offline: no account, no network), and its failures before training starts."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import longrun
import dqn_atari_meanexp as dqn
from conftest import ROOT

TINY = ["--env-id", "ALE/Pong-v5", "--total-timesteps", "400", "--learning-starts", "200", "--buffer-size", "1000",
        "--batch-size", "8", "--eval-interval", "200", "--eval-steps", "100", "--final-eval-episodes", "1",
        "--max-episode-steps", "100", "--log-interval", "100", "--no-cuda"]


def scalars(path):
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run(cwd, *flags, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "dqn_atari_meanexp.py"), *flags], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HOME": str(cwd), **(env or {})})


def test_track_offline_writes_a_local_wandb_run_holding_the_tensorboard_scalars(tmp_path):
    proc = run(tmp_path, *TINY, "--track", "--wandb-group", "g", "--run-name", "t", env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = json.loads((tmp_path / "runs/t/config.json").read_text())
    (wandb_run,) = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{config['wandb_run_id']}"))
    (events,) = glob.glob(os.path.join(wandb_run, "files", "**", "events.out.tfevents.*"), recursive=True)
    logged, tracked = scalars(tmp_path / "runs/t"), scalars(os.path.dirname(events))
    assert {"losses/td_loss", "eval/episodic_return", "eval/overestimation"} <= tracked.keys()
    assert tracked == logged  # the run's own TensorBoard scalars, every one


def test_a_failed_wandb_login_stops_the_run_before_anything_is_written(tmp_path):
    proc = run(tmp_path, *TINY, "--track", "--run-name", "t", env={"WANDB_MODE": "online", "WANDB_API_KEY": ""})
    assert proc.returncode == longrun.EXIT_BAD_INPUT, proc.stdout + proc.stderr
    assert "--track: wandb could not start" in proc.stderr and "WANDB_MODE=offline" in proc.stderr
    assert not (tmp_path / "runs" / "t").exists()


def test_track_without_wandb_installed_is_refused_with_the_install_command(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    errors = longrun.check_flags(dqn.Args(track=True))
    assert any("--track needs wandb: pip install -r requirements-track.txt" in e for e in errors), errors
