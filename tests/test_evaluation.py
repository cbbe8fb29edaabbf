"""Evaluation: raw scores of whole episodes and the overestimation of PAPER.md, on hand-checkable episodes."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from dqn_atari_meanexp import discounted_returns, evaluate, linear_schedule


class ThreeStepEnv(gym.Env):
    """Every episode: 3 steps with raw rewards 2, 0, -5, then game over."""

    observation_space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    action_space = gym.spaces.Discrete(2)
    REWARDS = [2.0, 0.0, -5.0]

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return np.zeros((4, 84, 84), np.uint8), {}

    def step(self, action):
        self.t += 1
        return np.zeros((4, 84, 84), np.uint8), self.REWARDS[self.t - 1], self.t == 3, False, {}


class ConstantQ(torch.nn.Module):
    def q_values(self, x):
        return torch.tensor([[0.5, 1.5]]).expand(len(x), 2)


def test_scores_and_overestimation_exact():
    gamma = 0.9
    result = evaluate(ConstantQ(), ThreeStepEnv(), "cpu", epsilon=0.0, gamma=gamma, rng=np.random.default_rng(0), max_episodes=2)
    assert result["scores"] == [-3.0, -3.0]  # raw game score, not the clipped one
    assert result["lengths"] == [3, 3]
    realized = [1 - gamma * 0 + gamma**2 * -1, 0 + gamma * -1, -1]  # sign-clipped rewards 1, 0, -1
    assert result["overestimation"] == pytest.approx(1.5 - np.mean(realized), abs=1e-12)


def test_step_budget_drops_the_unfinished_episode():
    result = evaluate(ConstantQ(), ThreeStepEnv(), "cpu", 0.0, 0.99, np.random.default_rng(0), max_steps=7)
    assert result["steps"] == 7 and result["scores"] == [-3.0, -3.0]
    only_partial = evaluate(ConstantQ(), ThreeStepEnv(), "cpu", 0.0, 0.99, np.random.default_rng(0), max_steps=2)
    assert only_partial["scores"] == [2.0] and only_partial["lengths"] == [2]


def test_discounted_returns():
    np.testing.assert_allclose(discounted_returns([1, 0, 2], 0.5), [1 + 0 + 0.25 * 2, 0 + 0.5 * 2, 2])


def test_linear_schedule():
    assert linear_schedule(1.0, 0.01, 1_000_000, 0) == 1.0
    assert linear_schedule(1.0, 0.01, 1_000_000, 500_000) == pytest.approx(0.505)
    assert linear_schedule(1.0, 0.01, 1_000_000, 5_000_000) == pytest.approx(0.01, abs=1e-15)
    assert linear_schedule(1.0, 0.01, 0, 0) == 0.01


class TwoEstimates(torch.nn.Module):
    """A sampled Q (like IQN's): each row of a batch is a different estimate."""

    def q_values(self, x):
        assert len(x) == 2
        return torch.tensor([[0.5, 1.5], [7.0, 3.0]])


def test_recorded_q_is_an_estimate_independent_of_the_one_that_chose():
    gamma = 0.9
    result = evaluate(TwoEstimates(), ThreeStepEnv(), "cpu", epsilon=0.0, gamma=gamma, rng=np.random.default_rng(0), max_episodes=1)
    realized = [1 + gamma**2 * -1, gamma * -1, -1]
    # action 1 is chosen by the first estimate; its Q is recorded from the second (3.0), not the first (1.5)
    assert result["overestimation"] == pytest.approx(3.0 - np.mean(realized), abs=1e-12)
