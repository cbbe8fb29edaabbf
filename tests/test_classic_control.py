"""dqn_meanexp.py, the authors' LunarLander experiment: the head, PFRL's initialization and loss, the authors'
evaluation statistics, exact values where the math gives them; a tiny run end to end; bad flags refused."""

import glob
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dqn_meanexp as dqn
from conftest import ROOT

TINY = dict(total_timesteps=600, learning_starts=200, eval_interval=300, eval_episodes=2)


def test_the_head_adds_k_times_the_mean_and_its_gradient_is_one_plus_k_over_actions():
    u = torch.tensor([[1.0, 2.0, 3.0, 6.0]], requires_grad=True)
    torch.testing.assert_close(dqn.mean_expansion(u, 2.0), torch.tensor([[7.0, 8.0, 9.0, 12.0]]))  # mean 3, + 2 * 3
    torch.testing.assert_close(dqn.mean_expansion(u, 0.0), u)
    dqn.mean_expansion(u, 2.0)[0, 1].backward()  # dQ(s, 1)/du(s, b) = [1 == b] + k / |A|
    torch.testing.assert_close(u.grad, torch.tensor([[0.5, 1.5, 0.5, 0.5]]))


def test_network_is_the_authors_mlp_with_pfrls_initialization_and_the_head_last():
    torch.manual_seed(0)
    net = dqn.QNetwork(obs_size=8, n_actions=4, me_coef=3.0, obs_divisor=10.0)
    linears = [net.network[i] for i in (0, 2, 4)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == [(8, 256), (256, 256), (256, 4)]
    assert all(torch.count_nonzero(layer.bias) == 0 for layer in linears)  # PFRL's MLP: zero biases
    big = linears[1].weight
    assert big.std().item() == pytest.approx(256**-0.5, rel=0.02)  # LeCun normal: std 1/sqrt(fan_in)
    assert big.mean().item() == pytest.approx(0.0, abs=3 * 256**-0.5 / 256)
    assert linears[0].weight.std().item() == pytest.approx(8**-0.5, rel=0.05)
    x = torch.randn(5, 8) * 10
    u = net.network(x / 10.0)  # observations are divided by 10 before the first layer
    torch.testing.assert_close(net(x), u + 3.0 * u.mean(dim=1, keepdim=True))


class Table(torch.nn.Module):
    """Q(s, .) = TABLE[s], the state index being the observation's first number."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table)

    def forward(self, x):
        return self.table[x[:, 0].long()]


def test_td_loss_is_pfrls_mean_of_half_squared_errors_with_bootstraps_only_where_not_terminated():
    q, target = Table([[1.0, 2.0], [5.0, -3.0]]), Table([[0.0, 0.0], [4.0, 10.0]])
    batch = (torch.tensor([[0.0], [0.0], [1.0]]), torch.tensor([0, 1, 0]), torch.tensor([1.0, -0.5, 2.0]),
             torch.tensor([[1.0], [1.0], [0.0]]), torch.tensor([0.0, 1.0, 0.0]))
    loss, q_all = dqn.td_loss(q, target, batch, gamma=0.5)
    # targets: 1 + 0.5 * max(4, 10) = 6 (a time limit's cut still bootstraps); -0.5 (terminated); 2 + 0.5 * 0 = 2
    deltas = np.array([6.0 - 1.0, -0.5 - 2.0, 2.0 - 5.0])
    assert loss.item() == pytest.approx((deltas**2 / 2).mean())  # the mean, not the sum (clip_delta off)
    torch.testing.assert_close(q_all, q.table[[0, 0, 1]])


def test_epsilon_decays_as_pfrls_linear_schedule():
    values = [dqn.linear_schedule(1.0, 0.05, 10_000, t) for t in (0, 2_500, 10_000, 50_000)]
    assert values == pytest.approx([1.0, 1.0 - 0.95 / 4, 0.05, 0.05])


def test_episode_statistics_are_the_authors_on_a_hand_made_episode():
    # rewards 10 and -10 learned as 1 and -1; the time limit cut the episode where Q(s_T, greedy) = 4
    stats = dqn.episode_statistics(q_taken=[1.0, 2.0], rewards=[10.0, -10.0], gamma=0.5, reward_scale=0.1, bootstrap=4.0)
    # G_1 = -1 + 0.5 * 4 = 1, G_0 = 1 + 0.5 * 1 = 1.5; Q - G = -0.5 and 1
    assert stats == pytest.approx({"score": 0.0, "length": 2, "overestimation": 0.25, "normalized_overestimation": 0.25 / 1.5,
                                   "mean_q": 1.5, "mean_return": 1.25})


def test_an_evaluation_summary_uses_ddof_1_and_counts_cut_episodes():
    episodes = [{"score": s, "length": 10, "overestimation": o, "normalized_overestimation": 0.0, "mean_q": 1.0,
                 "mean_return": 0.0, "truncated": t} for s, o, t in ((1.0, 2.0, True), (3.0, 4.0, False), (8.0, 0.0, True))]
    stats = dqn.summarize(episodes)
    assert stats["mean"] == 4.0 and stats["median"] == 3.0 and stats["min"] == 1.0 and stats["max"] == 8.0
    assert stats["stdev"] == pytest.approx(np.sqrt(((1 - 4) ** 2 + (3 - 4) ** 2 + (8 - 4) ** 2) / 2))  # statistics.stdev
    assert stats["overestimation"] == 2.0 and stats["truncated"] == 2 and stats["episodes"] == 3


def test_defaults_are_the_authors_lunar_lander_experiment():
    a = dqn.Args()
    assert (a.env_id, a.me_coef, a.total_timesteps, a.learning_rate, a.adam_eps) == ("LunarLander-v3", 4.0, 100_000, 1e-3, 3.125e-4)
    assert (a.batch_size, a.learning_starts, a.train_frequency, a.target_network_frequency) == (128, 1_000, 1, 100)
    assert (a.buffer_size, a.gamma, a.start_e, a.end_e, a.exploration_steps) == (500_000, 0.99, 1.0, 0.05, 10_000)
    assert (a.obs_divisor, a.reward_scale, a.eval_interval, a.eval_episodes) == (10.0, 0.1, 10_000, 100)
    assert a.cuda is False  # the CPU, as the sweep: a GPU does not pay at batch 1 (issue 33; docs/lunar_lander.md)


def read_run(run_dir):
    with open(os.path.join(run_dir, "evaluations.json")) as f:
        return json.load(f)


def test_a_tiny_run_evaluates_before_and_during_training_and_writes_its_run(in_tmp):
    evaluations = dqn.main(dqn.Args(**TINY, save_model=True))
    assert [e["step"] for e in evaluations] == [0, 300, 600]
    assert evaluations[0]["action_gap"] is None and all(e["action_gap"] > 0 for e in evaluations[1:])
    assert all(e["episodes"] == 2 and np.isfinite(e["mean"]) and np.isfinite(e["overestimation"]) for e in evaluations)
    (run_dir,) = glob.glob("runs/LunarLander-v3__dqn_meanexp__k4__1__*")
    saved = read_run(run_dir)
    assert saved["evaluations"] == evaluations and saved["config"]["me_coef"] == 4.0 and saved["config"]["n_actions"] == 4
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    state = torch.load(os.path.join(run_dir, "dqn_meanexp.cleanrl_model"))
    assert state["network.4.weight"].shape == (4, 256)
    again = dqn.main(dqn.Args(**TINY, exp_name="again"))  # the same seed: the same run, number for number
    assert again == evaluations
    other = dqn.main(dqn.Args(**TINY, exp_name="other", seed=2))
    assert other[0]["mean"] != evaluations[0]["mean"]  # the seed reaches the network and the evaluation env


def test_capture_video_writes_the_training_episodes(in_tmp):
    dqn.main(dqn.Args(total_timesteps=300, learning_starts=200, eval_interval=300, eval_episodes=1, capture_video=True))
    assert glob.glob("runs/*/videos/*.mp4")


@pytest.mark.parametrize("flags,message", [
    (["--me-coef", "-1"], "--me-coef must be in [0, inf]"),
    (["--batch-size", "0"], "--batch-size must be in [1, inf]"),
    (["--learning-starts", "10"], "need --batch-size <= --learning-starts <= --buffer-size"),
    (["--end-e", "1.5"], "--end-e must be in [0, 1]"),
    (["--env-id", "CarRacing-v3"], "needs a flat Box observation and Discrete actions"),
    (["--env-id", "NoSuchEnv-v0"], "--env-id NoSuchEnv-v0"),
    (["--me-coef", "inf"], "--me-coef must be a finite number, got inf"),  # issue 34: these used to train to NaN
    (["--obs-divisor", "nan"], "--obs-divisor must be a finite number, got nan"),
    (["--reward-scale", "nan"], "--reward-scale must be a finite number, got nan"),
    (["--learning-rate", "inf"], "--learning-rate must be a finite number, got inf"),
    (["--seed", "-1"], "--seed must be in [0, 2^32 - 2], got -1"),  # these gave tracebacks after the run directory
    (["--seed", "4294967296"], "--seed must be in [0, 2^32 - 2], got 4294967296"),
    (["--exp-name", "../../x"], "--exp-name '../../x' must be a plain name"),  # it escaped runs/
    (["--env-id", "nosuchmodule:Foo-v0"], "--env-id nosuchmodule:Foo-v0: No module named 'nosuchmodule'"),  # a traceback
])
def test_bad_flags_are_refused_before_anything_is_written(in_tmp, flags, message):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "dqn_meanexp.py"), *flags, "--eval-episodes", "0"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr and "--eval-episodes must be in [1, inf]" in result.stderr  # every error at once
    assert not os.path.exists("runs")


def test_a_write_that_dies_midway_leaves_the_earlier_evaluations_whole(in_tmp, monkeypatch):
    """evaluations.json is written beside and renamed over the old one: a Ctrl-C or a full disk during the write used
    to leave it empty or cut mid-row (issue 34)."""
    real_dump, calls = json.dump, []

    def dies_on_the_second_write(data, f, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write('{"config": {"cut')
            raise OSError(28, "No space left on device")
        real_dump(data, f, **kwargs)

    monkeypatch.setattr(json, "dump", dies_on_the_second_write)
    with pytest.raises(OSError):
        dqn.main(dqn.Args(**TINY))
    monkeypatch.setattr(json, "dump", real_dump)
    (run_dir,) = glob.glob("runs/LunarLander-v3__dqn_meanexp__k4__1__*")
    assert [row["step"] for row in read_run(run_dir)["evaluations"]] == [0]


def test_two_runs_started_in_the_same_second_keep_a_directory_each(in_tmp, monkeypatch):
    ticks = itertools.count()
    monkeypatch.setattr(dqn.time, "time", lambda: 1_800_000_000.0 + next(ticks) * 1e-6)  # all within one second
    settings = dict(TINY, total_timesteps=250, eval_interval=250, eval_episodes=1)
    first, second = dqn.main(dqn.Args(**settings)), dqn.main(dqn.Args(**settings))
    dirs = sorted(glob.glob("runs/*"))
    assert [os.path.basename(d) for d in dirs] == ["LunarLander-v3__dqn_meanexp__k4__1__1800000000",
                                                  "LunarLander-v3__dqn_meanexp__k4__1__1800000000_2"]
    assert [read_run(d)["evaluations"] for d in dirs] == [first, second]


def test_a_run_that_cannot_learn_or_ends_unevaluated_says_so_and_names_its_directory(in_tmp, capsys):
    dqn.main(dqn.Args(total_timesteps=150, learning_starts=200, eval_interval=100, eval_episodes=1))
    out, err = capsys.readouterr()
    assert "logs in runs/LunarLander-v3__dqn_meanexp__k4__1__" in out
    assert "the network will make no update" in err  # issue 34: these passed in silence
    assert "the last 50 steps' network is never evaluated" in err


def run_script(*flags, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "dqn_meanexp.py"), *flags], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_a_working_directory_it_cannot_write_into_is_named_not_a_traceback(in_tmp):
    """Issue 34: a read-only working directory gave a traceback. (As root every folder is writable: a file named runs
    stands in for one, making the run directory just as impossible.)"""
    open("runs", "w").close()
    result = run_script("--total-timesteps", "300", "--learning-starts", "200", "--eval-interval", "300")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "error: cannot make the run directory runs/" in result.stderr and "a folder you can write into" in result.stderr


def test_track_without_a_wandb_login_says_how_and_leaves_no_run_directory(in_tmp):
    """Issue 34: --track without a login gave a traceback; the Atari scripts exit 2 with advice, and so does this one."""
    result = run_script("--total-timesteps", "300", "--learning-starts", "200", "--eval-interval", "300", "--track",
                        env={"WANDB_MODE": "online", "WANDB_API_KEY": ""})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "--track: wandb could not start" in result.stderr and "WANDB_MODE=offline" in result.stderr
    assert not os.listdir("runs")
