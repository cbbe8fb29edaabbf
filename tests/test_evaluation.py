"""Evaluation: raw scores of whole episodes and the authors' overestimation, on hand-checkable episodes."""

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


# ---------------------------------------------------------------------------
# The authors' overestimation (docs/analysis.md), on scripted episodes with a known Q
# ---------------------------------------------------------------------------


class ScriptedEnv(gym.Env):
    """Episodes of the given lengths and ends; at step t the observation is t and the raw reward REWARDS[t].
    It records the actions it executes."""

    observation_space = gym.spaces.Box(0, 255, (1,), np.uint8)
    action_space = gym.spaces.Discrete(2)
    REWARDS = [2.0, 0.0, -5.0]

    def __init__(self, episodes):
        self.episodes, self.executed = list(episodes), []

    def reset(self, *, seed=None, options=None):
        self.t, (self.length, self.end) = 0, self.episodes.pop(0) if len(self.episodes) > 1 else self.episodes[0]
        return np.array([0], np.uint8), {}

    def step(self, action):
        self.executed.append(action)
        self.t += 1
        done = self.t == self.length
        return np.array([self.t], np.uint8), self.REWARDS[self.t - 1], done and self.end == "terminated", \
            done and self.end == "truncated", {}


class TableQ(torch.nn.Module):
    """Q(s_t, .) = TABLE[t]: the greedy action is 1, 0, 1, 0 at t = 0, 1, 2, 3."""

    TABLE = torch.tensor([[1.0, 3.0], [0.5, -1.0], [2.0, 2.5], [4.0, 0.0]])

    def q_values(self, x):
        return self.TABLE[x[:, 0].long()]


class ScriptedRng:
    """Epsilon's coin comes up in the given order; a random action is always action 1."""

    def __init__(self, coins):
        self.coins = list(coins)

    def random(self):
        return self.coins.pop(0)

    def integers(self, n):
        return 1


GAMMA = 0.9
# clipped rewards 1, 0, -1; recorded Q of the greedy actions 3.0, 0.5, 2.5
TERMINATED = dict(returns=[1 + 0.9 * (0 + 0.9 * -1), 0 + 0.9 * -1, -1.0], q=[3.0, 0.5, 2.5])
BOOTSTRAP = 4.0  # Q(s_3, greedy action 0): the cut episode's return goes on from there
G2 = -1 + 0.9 * BOOTSTRAP
TRUNCATED = dict(returns=[1 + 0.9 * (0.9 * G2), 0.9 * G2, G2], q=[3.0, 0.5, 2.5])


def expected(episode, discounted_return):
    q, g = np.array(episode["q"]), np.array(episode["returns"])
    return dict(overestimation=np.mean(q - g), normalized_overestimation=np.mean((q - g) / abs(q.mean())), mean_q=q.mean(),
                mean_return=g.mean(), mean_discounted_return=discounted_return)


@pytest.mark.parametrize("end,episode", [("terminated", TERMINATED), ("truncated", TRUNCATED)])
def test_overestimation_of_a_scripted_episode(end, episode):
    env, rng = ScriptedEnv([(3, end)]), ScriptedRng([0.9, 0.0, 0.9])  # epsilon replaces the greedy action at t = 1
    result = evaluate(TableQ(), env, "cpu", epsilon=0.5, gamma=GAMMA, rng=rng, max_episodes=1)
    assert env.executed == [1, 1, 1]  # the second was random (greedy: 0) ...
    # ... but Q is recorded for the greedy action, before epsilon replaced it: 3.0, 0.5, 2.5
    g0_unbootstrapped = 1 + 0.9 * (0 + 0.9 * -1)
    for key, value in expected(episode, g0_unbootstrapped).items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    assert result["truncated_episodes"] == (end == "truncated")
    assert result["scores"] == [-3.0] and result["lengths"] == [3]


def test_statistics_are_averaged_per_episode_then_over_episodes():
    """A 3-step terminated episode and a 1-step truncated one: each counts once, whatever its length."""
    env = ScriptedEnv([(3, "terminated"), (1, "truncated"), (3, "terminated")])
    result = evaluate(TableQ(), env, "cpu", epsilon=0.0, gamma=GAMMA, rng=ScriptedRng([0.9] * 5), max_episodes=2)
    short = dict(q=[3.0], returns=[1 + 0.9 * 0.5])  # bootstrapped with Q(s_1, greedy action 0) = 0.5
    first, second = expected(TERMINATED, TERMINATED["returns"][0]), expected(short, 1.0)
    for key in first:
        assert result[key] == pytest.approx((first[key] + second[key]) / 2, abs=1e-12), key
    assert result["truncated_episodes"] == 1 and result["scores"] == [-3.0, 2.0]
    pooled = np.mean(np.array(TERMINATED["q"] + short["q"]) - np.array(TERMINATED["returns"] + short["returns"]))
    assert result["overestimation"] != pytest.approx(pooled)  # not pooled over steps


def test_an_unfinished_episode_is_left_out_of_the_statistics():
    env = ScriptedEnv([(3, "terminated"), (3, "terminated")])
    result = evaluate(TableQ(), env, "cpu", 0.0, GAMMA, ScriptedRng([0.9] * 5), max_steps=5)
    assert result["scores"] == [-3.0] and result["steps"] == 5
    assert result["overestimation"] == pytest.approx(expected(TERMINATED, 0.19)["overestimation"], abs=1e-12)
    none_finished = evaluate(TableQ(), ScriptedEnv([(3, "terminated")]), "cpu", 0.0, GAMMA, ScriptedRng([0.9] * 2), max_steps=2)
    assert none_finished["scores"] == [2.0]  # PFRL scores the partial episode when none finished ...
    assert none_finished["overestimation"] is None and none_finished["mean_q"] is None  # ... but measures nothing on it
