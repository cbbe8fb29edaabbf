"""The pieces of the training loop a reader modifies first: acting and the progress line."""

import numpy as np
import pytest
import torch

import longrun
import dqn_atari_meanexp as dqn


class FixedQ(torch.nn.Module):
    """Q(s, .) = the same row for every observation."""

    def __init__(self, row):
        super().__init__()
        self.row = torch.tensor(row)

    def q_values(self, obs):
        return self.row.expand(len(obs), -1)


def test_act_is_greedy_at_epsilon_0_and_uniform_at_epsilon_1():
    obs = np.zeros((4, 4, 84, 84), dtype=np.uint8)
    net = FixedQ([0.0, 2.0, 1.0])
    greedy = dqn.act(net, obs, 0.0, np.random.default_rng(0), 3, "cpu")
    assert greedy.tolist() == [1, 1, 1, 1]
    rng = np.random.default_rng(0)
    draws = np.concatenate([dqn.act(net, obs, 1.0, rng, 3, "cpu") for _ in range(1000)])
    assert np.bincount(draws, minlength=3) / len(draws) == pytest.approx([1 / 3] * 3, abs=0.03)  # 4 standard errors
    rng, twin = np.random.default_rng(5), np.random.default_rng(5)
    mixed = dqn.act(net, obs, 0.5, rng, 3, "cpu")  # one coin per env: greedy where it says so, else the random action
    random_actions, coins = twin.integers(3, size=4), twin.random(4)
    assert mixed.tolist() == np.where(coins >= 0.5, 1, random_actions).tolist()


def line_of(progress, state, now):
    """The line the loop asks for (train() passes these LoopState fields)."""
    return progress.line(state.global_step, state.episodes, state.recent_returns, state.updates_from[0], now)


def test_the_eta_uses_the_recent_rate_not_the_whole_runs_average():
    args = dqn.Args(total_timesteps=1_000_000, progress_interval=30)
    progress = longrun.Progress(args.total_timesteps, args.progress_interval, step=0, now=0.0, window=10)
    state = dqn.LoopState(obs=None, resetting=None, sums=None, bad_step=None, updates_from=(0, 0))
    state.global_step = 50_000  # collecting before learning starts: fast
    assert line_of(progress, state, 30.0) is not None
    assert line_of(progress, state, 31.0) is None  # the next line is due 30 s later
    now = 30.0
    for _ in range(10):  # learning: 140 agent steps per second
        now += 30
        state.global_step += 140 * 30
        line = line_of(progress, state, now)
    eta = longrun.format_duration((1_000_000 - state.global_step) / 140)  # the whole run's average would say half of it
    assert "140 SPS recently" in line and f"ETA {eta}" in line, line
    state.global_step = 1_000_000
    assert line_of(progress, state, now + 1) is not None  # the end of training always gets a line


def test_the_eta_counts_only_the_steps_since_learning_started():
    """Steps before learning starts run several times faster: an ETA from them would promise hours for days. (It used to
    wait until the whole window was past learning_starts: minutes of "not known yet" on a run that learns from step 1,000.)"""
    args = dqn.Args(total_timesteps=1_000_000, progress_interval=30)
    progress = longrun.Progress(args.total_timesteps, args.progress_interval, step=0, now=0.0, window=3)
    state = dqn.LoopState(obs=None, resetting=None, sums=None, bad_step=None, updates_from=(50_000, 0))
    lines = []
    for i, step in enumerate((20_000, 40_000, 50_500, 51_000, 51_500, 52_000)):
        state.global_step = step
        lines.append(line_of(progress, state, 30.0 * (i + 1)))
    assert all("ETA not known yet (learning starts at step 50,000)" in line for line in lines[:3]), lines
    # from the second line after learning started, the rate is theirs alone (the lines before it are left out)
    assert f"ETA {longrun.format_duration((1_000_000 - 51_000) / (500 / 30))}" in lines[3], lines[3]
    rate = (52_000 - 50_500) / 90  # the window: the lines at 50,500 (90 s earlier) to 52,000
    assert f"ETA {longrun.format_duration((1_000_000 - 52_000) / rate)}" in lines[5], lines[5]
    state.global_step = 1_000_000  # a run shorter than the window: it never said learning had started (issue 34)
    progress = longrun.Progress(args.total_timesteps, args.progress_interval, step=0, now=0.0, window=3)
    assert "ETA none: training is done" in line_of(progress, state, 10.0)
