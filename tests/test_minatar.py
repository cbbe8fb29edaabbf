"""dqn_minatar_meanexp.py: MinAtar's games as the script sees them, its network and protocol, a short run that learns,
exact resume, and the refusals. What it shares with the Atari scripts is guarded word for word in test_shared_code.py."""

import json
import os
import signal
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import dqn_minatar_meanexp as mz
import longrun
from conftest import ROOT
from test_resume import interrupt, load_model, scalars

SCRIPT = os.path.join(ROOT, "dqn_minatar_meanexp.py")
TINY = ["--total-timesteps", "1500", "--learning-starts", "200", "--buffer-size", "1000", "--batch-size", "8",
        "--eval-interval", "500", "--eval-steps", "200", "--final-eval-episodes", "2", "--log-interval", "100",
        "--target-network-frequency", "100", "--no-cuda"]
CHANNELS = {"Asterix": 4, "Breakout": 4, "Freeway": 7, "Seaquest": 10, "SpaceInvaders": 6}  # MinAtar's kinds of object


def run(cwd, *flags, code=0):
    proc = subprocess.run([sys.executable, SCRIPT, *flags], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == code, proc.stdout + proc.stderr
    return proc


@pytest.mark.parametrize("game", mz.GAMES)
def test_every_game_is_one_frame_of_its_channels_with_the_full_action_set_by_default(game):
    args = mz.Args(env_id=f"MinAtar/{game}-v1")
    assert mz.game_frame(args.env_id) == (CHANNELS[game], 10, 10) and mz.game_actions(args) == 6
    env = mz.make_env(args, seed=3)()
    obs, _ = env.reset(seed=3)
    assert obs.shape == (1, CHANNELS[game], 10, 10) and obs.dtype == np.uint8 and set(np.unique(obs)) <= {0, 1}
    raw = env.unwrapped.game.state()  # (10, 10, C) bool: channel c of the frame is MinAtar's channel c
    assert np.array_equal(obs[0], raw.transpose(2, 0, 1))
    minimal = mz.game_actions(mz.Args(env_id=f"MinAtar/{game}-v1", full_action_space=False))
    assert minimal == len(env.unwrapped.game.minimal_action_set()) <= 6  # Seaquest needs all 6


def test_the_network_is_minatars_with_pfrl_init_and_the_head_last():
    torch.manual_seed(0)
    net = mz.QNetwork(n_actions=6, me_coef=6.0, channels=7)
    conv, linear, out = net.network[0], net.network[3], net.network[5]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (7, 16, (3, 3), (1, 1))
    assert (linear.in_features, linear.out_features, out.in_features, out.out_features) == (1024, 128, 128, 6)
    assert all(float(layer.bias.detach().abs().max()) == 0.0 for layer in (conv, linear, out))
    assert abs(float(linear.weight.detach().std()) - 1024**-0.5) < 0.05 * 1024**-0.5  # LeCun normal: std 1/sqrt(fan_in)
    x = torch.randint(0, 2, (5, 1, 7, 10, 10), dtype=torch.uint8)
    u = net.network(x.flatten(1, 2).float())
    assert torch.equal(net(x), u + 6.0 * u.mean(dim=1, keepdim=True))  # the head: Q = u + k mean u


def test_the_defaults_are_revisiting_rainbows_dqn_with_the_papers_loss():
    args = mz.Args()
    assert (args.env_id, args.full_action_space, args.sticky_action_prob, args.difficulty_ramping) == (
        "MinAtar/Breakout-v1", True, 0.1, True)
    assert (args.learning_rate, args.optimizer_eps, args.batch_size, args.buffer_size, args.gamma) == (
        2.5e-4, 3.125e-4, 32, 100_000, 0.99)
    assert (args.train_frequency, args.target_network_frequency, args.learning_starts) == (4, 1_000, 1_000)
    assert (args.start_e, args.end_e, args.exploration_steps, args.eval_epsilon) == (1.0, 0.01, 250_000, 0.001)
    assert (args.total_timesteps, args.loss, args.me_coef) == (10_000_000, "sse", None)
    assert mz.default_me_coef(args, 6) == 6.0


def test_repeated_updates_on_one_batch_fit_it():
    """The loss, the head and Adam learn: 300 updates on one batch of 32 transitions cut its TD loss tenfold."""
    torch.manual_seed(0)
    args = mz.Args()
    net = mz.QNetwork(6, 6.0, channels=4)
    target = mz.QNetwork(6, 6.0, channels=4)
    target.load_state_dict(net.state_dict())
    g = torch.Generator().manual_seed(1)
    batch = mz.Batch(obs=torch.randint(0, 2, (32, 1, 4, 10, 10), generator=g, dtype=torch.uint8),
                     actions=torch.randint(0, 6, (32,), generator=g), rewards=torch.randint(0, 2, (32,), generator=g).float(),
                     next_obs=torch.randint(0, 2, (32, 1, 4, 10, 10), generator=g, dtype=torch.uint8),
                     terminated=torch.ones(32), truncated=torch.zeros(32))  # terminal: the targets are the rewards
    optimizer = mz.make_optimizer(args, net)
    first = float(mz.update(net, target, optimizer, batch, args)[0])
    for _ in range(300):
        last = float(mz.update(net, target, optimizer, batch, args)[0])
    assert last < first / 10, (first, last)


def random_play_score(env_id: str, episodes: int, seed: int) -> float:
    """The mean score of uniformly random actions over whole games of the script's own env."""
    env = mz.make_env(mz.Args(env_id=env_id), seed=seed)()
    env.reset(seed=seed)
    scores = []
    while len(scores) < episodes:
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        if terminated or truncated:
            scores.append(float(info["episode"]["r"]))
            env.reset()
    return float(np.mean(scores))


def test_a_short_run_learns_breakout_and_records_its_evaluations_and_claim_statistics(tmp_path):
    """15,000 steps of Breakout (epsilon down to 0.01 by step 5,000, 3,625 updates) play better than chance: the best
    network's 20 final games score at least twice what random play scores. 15,000-step runs of seeds 1 to 12 (no
    periodic evaluation, 10 games) and 1 to 5 (these flags) scored 1.8 to 4.3 on a 2-core Xeon, against random play's
    0.5; at 10,000 steps one seed in five still scored 0, so the run is not made shorter."""
    flags = ["--env-id", "MinAtar/Breakout-v1", "--total-timesteps", "15000", "--learning-starts", "500",
             "--exploration-steps", "5000", "--buffer-size", "15000", "--eval-interval", "5000", "--eval-steps", "2000",
             "--final-eval-episodes", "20", "--log-interval", "1000", "--no-cuda", "--run-name", "short",
             "--save-model"]
    proc = subprocess.run([sys.executable, SCRIPT, *flags], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # one thread, as run_all.sh runs it
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = json.loads((tmp_path / "runs/short/config.json").read_text())
    assert (config["n_actions"], config["me_coef"], config["me_coef_default"]) == (6, 6.0, True)
    assert config["frame_shape"] == [4, 10, 10]
    final = json.loads((tmp_path / "runs/short/final_eval.json").read_text())
    assert final["episodes"] == 20 and final["total_steps"] == 15000 and final["network"].startswith("best periodic")
    random_score = random_play_score("MinAtar/Breakout-v1", episodes=200, seed=0)
    assert 0.3 < random_score < 0.9, random_score  # MinAtar's Breakout: about 0.6 by chance
    assert final["mean"] >= 2 * random_score, (final["mean"], random_score, final["scores"])
    logs = scalars(tmp_path / "runs/short")
    assert [s for s, _ in logs["eval/episodic_return"]] == [5000, 10000, 15000]
    assert [s for s, _ in logs["claims/relative_action_gap"]] == [5000, 10000, 15000]  # target syncs every 1,000 steps
    assert all(np.isfinite(v) for _, v in logs["losses/td_loss"])
    assert len(logs["charts/SPS"]) == 15 and all(v > 0 for _, v in logs["charts/SPS"])  # one a log interval
    assert "step 15,000/15,000 (100.0%)" in proc.stdout and "ETA none: training is done" in proc.stdout
    assert (tmp_path / "runs/short/dqn_minatar_meanexp_best.cleanrl_model").exists()


def test_a_stopped_then_resumed_run_equals_an_uninterrupted_run(tmp_path):
    flags = [*TINY, "--env-id", "MinAtar/Seaquest-v1", "--save-model", "--progress-interval", "0.001"]
    run(tmp_path, *flags, "--run-name", "straight")
    proc = subprocess.Popen([sys.executable, "-u", SCRIPT, *flags, "--run-name", "cut"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = interrupt(proc, at_step=600, sig=signal.SIGTERM)
    assert proc.returncode == longrun.EXIT_REQUEUE, output
    resumed = run(tmp_path, "--resume", "runs/cut")
    assert "resumed runs/cut at step" in resumed.stdout
    a, b = (load_model(tmp_path / f"runs/{r}/dqn_minatar_meanexp.cleanrl_model") for r in ("straight", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs_a, logs_b = scalars(tmp_path / "runs/straight"), scalars(tmp_path / "runs/cut")
    for tag in ("losses/td_loss", "charts/episodic_return", "eval/episodic_return", "claims/relative_action_gap"):
        assert logs_a[tag] == logs_b[tag], tag
    final_a, final_b = (json.loads((tmp_path / f"runs/{r}/final_eval.json").read_text()) for r in ("straight", "cut"))
    assert final_a["scores"] == final_b["scores"] and final_a["overestimation"] == final_b["overestimation"]


def test_the_snapshot_of_a_minatar_env_replays_the_same_game():
    env = mz.make_env(mz.Args(env_id="MinAtar/Asterix-v1"), seed=5)()
    env.reset(seed=5)
    for action in [1, 2, 3] * 5:
        env.step(action)
    saved = env.snapshot
    rng = np.random.default_rng(0)
    actions = rng.integers(6, size=200)

    def play():
        seen = []
        for action in actions:
            obs, reward, terminated, truncated, _ = env.step(int(action))
            seen.append((obs.tobytes(), reward, terminated))
            if terminated or truncated:
                env.reset()
        return seen

    first = play()
    env.snapshot = saved
    assert play() == first


@pytest.mark.parametrize("flags,messages", [
    (["--env-id", "MinAtar/Pong-v1", "--learning-rate", "nan", "--me-coef", "inf", "--sticky-action-prob", "1.0"],
     ["is not a MinAtar game; use one of MinAtar/Asterix-v1, MinAtar/Breakout-v1, MinAtar/Freeway-v1, "
      "MinAtar/Seaquest-v1, MinAtar/SpaceInvaders-v1", "--learning-rate must be", "--me-coef must be a finite number >= 0",
      "--sticky-action-prob must be in [0, 1)"]),
    (["--env-id", "ALE/Breakout-v5", "--learning-rate", "inf"],
     ["is not a MinAtar game", "--learning-rate must be a finite number"]),
])
def test_bad_flags_are_refused_together_with_exit_2_before_anything_is_written(tmp_path, flags, messages):
    """Every bad flag of a command line is named in one refusal (one subprocess for several: the suite's time)."""
    proc = run(tmp_path, *TINY, *flags, code=2)
    assert [m for m in messages if m not in proc.stderr] == [] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("k", [float("nan"), float("-inf"), -1.0])
def test_a_k_that_is_not_a_finite_number_at_least_0_is_refused(k):
    """--me-coef is optional (None: |A|), so the test over every plain float flag in test_bad_input.py passes it by."""
    assert mz.check_args(mz.Args(me_coef=k)) == [f"--me-coef must be a finite number >= 0 (got {k}); 0 is plain DQN"]


def test_without_minatar_the_error_gives_the_install_command(monkeypatch):
    monkeypatch.setattr(mz, "MINATAR_INSTALLED", False)
    errors = mz.check_args(mz.Args())
    assert "MinAtar is not installed: python -m pip install -r requirements.txt (it pins minatar)" in errors


def test_without_minatar_the_command_exits_2_with_the_install_command_and_writes_nothing(tmp_path):
    """The whole command line, as a user without minatar runs it: importlib finds no minatar (as where it is not
    installed), and the script refuses before it writes anything."""
    hide = ("import importlib.util, runpy, sys; find_spec = importlib.util.find_spec; importlib.util.find_spec = "
            "lambda name, package=None: None if name.split('.')[0] == 'minatar' else find_spec(name, package); "
            f"sys.path.insert(0, {ROOT!r}); sys.argv = [{SCRIPT!r}, *sys.argv[1:]]; runpy.run_path({SCRIPT!r}, "
            "run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", hide, "--env-id", "MinAtar/Breakout-v1", *TINY], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "MinAtar is not installed: python -m pip install -r requirements.txt" in proc.stderr
    assert "Traceback" not in proc.stderr and os.listdir(tmp_path) == []


def test_a_minimal_action_set_with_the_default_k_warns_that_k_is_not_the_full_sets(tmp_path):
    proc = run(tmp_path, *TINY, "--total-timesteps", "300", "--eval-interval", "0", "--no-full-action-space",
               "--run-name", "minimal")
    assert "k defaults to this game's |A| = 3, not to the full set's 6" in proc.stderr
    assert json.loads((tmp_path / "runs/minimal/config.json").read_text())["me_coef"] == 3.0
    quiet = run(tmp_path, *TINY, "--total-timesteps", "300", "--eval-interval", "0", "--no-full-action-space",
                "--me-coef", "6", "--run-name", "chosen", "--save-model")
    assert "k defaults" not in quiet.stderr
    seaquest = run(tmp_path, *TINY, "--total-timesteps", "300", "--eval-interval", "0", "--no-full-action-space",
                   "--env-id", "MinAtar/Seaquest-v1", "--run-name", "seaquest")
    assert "k defaults" not in seaquest.stderr  # Seaquest's minimal set is all 6 actions: k = |A| = 6 still
    assert json.loads((tmp_path / "runs/seaquest/config.json").read_text())["me_coef"] == 6.0
    minimal = {game: mz.game_actions(mz.Args(env_id=f"MinAtar/{game}-v1", full_action_space=False)) for game in mz.GAMES}
    assert minimal == {"Asterix": 5, "Breakout": 3, "Freeway": 3, "Seaquest": 6, "SpaceInvaders": 4}
    # --eval-model: the saved network, on the run's own settings (its minimal action set), replays the final evaluation
    again = run(tmp_path, "--eval-model", "runs/chosen/dqn_minatar_meanexp.cleanrl_model")
    assert "evaluation of runs/chosen/dqn_minatar_meanexp.cleanrl_model" in again.stdout
    final, replay = (json.loads((tmp_path / f"runs/chosen/{name}.json").read_text())
                     for name in ("final_eval", "dqn_minatar_meanexp_eval_seed1"))
    keys = ("scores", "lengths", "mean", "overestimation", "normalized_overestimation", "mean_q", "truncated_episodes")
    assert {k: replay[k] for k in keys} == {k: final[k] for k in keys} and replay["episodes"] == 2


def test_ctrl_c_keeps_the_work_with_a_checkpoint_and_exit_130(tmp_path):
    proc = subprocess.Popen([sys.executable, "-u", SCRIPT, *TINY, "--env-id", "MinAtar/Breakout-v1", "--run-name", "cut",
                             "--progress-interval", "0.001"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = interrupt(proc, at_step=400, sig=signal.SIGINT)
    assert proc.returncode == longrun.EXIT_INTERRUPTED == 130, output
    assert "signal SIGINT: checkpoint at step" in output and "--resume runs/cut" in output and "Traceback" not in output
    assert (tmp_path / "runs/cut/checkpoint.pt").exists() and not (tmp_path / "runs/cut/final_eval.json").exists()


def test_the_ids_are_minatars_own_registrations_of_its_five_games():
    """Importing the script registers MinAtar's ids through minatar itself (no id of ours), each naming its game."""
    for game in mz.GAMES:
        spec = gym.spec(f"MinAtar/{game}-v1")
        assert spec.entry_point == "minatar.gym:BaseEnv", spec
        assert spec.kwargs["game"] == {"SpaceInvaders": "space_invaders"}.get(game, game.lower())
