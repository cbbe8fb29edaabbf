"""The frame-once replay buffer gives back exactly the stacks the environments produced."""

import json
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import ROOT
from dqn_atari_meanexp import Args, ReplayBuffer, make_train_envs

STACK = 4


class StampEnv(gym.Env):
    """Every frame it shows carries (env, episode, step) in its first pixels, so any frame
    in a sampled stack can be traced back. Ends by termination with probability 0.15."""

    observation_space = gym.spaces.Box(0, 255, (84, 84), np.uint8)
    action_space = gym.spaces.Discrete(5)

    def __init__(self, env_index):
        self.env_index, self.episode = env_index, -1

    def _frame(self):
        frame = np.full((84, 84), 7, np.uint8)
        frame[0, :3] = (self.env_index, self.episode, self.t)
        return frame

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode, self.t = self.episode + 1, 0
        return self._frame(), {}

    def step(self, action):
        self.t += 1
        reward = float(self.np_random.integers(-3, 4))
        return self._frame(), reward, bool(self.np_random.random() < 0.15), False, {}


def make_stamp_envs(num_envs, max_steps):
    def thunk(i):
        return lambda: gym.wrappers.FrameStackObservation(gym.wrappers.TimeLimit(StampEnv(i), max_steps), STACK)

    return gym.vector.SyncVectorEnv([thunk(i) for i in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


def run_into_buffer(envs, rb, steps, seed=0):
    """Drives envs the way the training loop does; returns every transition the envs produced, per env in order."""
    rng = np.random.default_rng(seed)
    n = envs.num_envs
    obs, _ = envs.reset(seed=seed)
    rb.start_episodes(obs[:, -1])
    starting = np.zeros(n, bool)
    frames = [[(obs[i], True)] for i in range(n)]  # per env: (stack the env returned, starts an episode)
    transitions = [[] for _ in range(n)]  # per env: (obs, action, reward, terminated, truncated, next_obs)
    for _ in range(steps):
        actions = rng.integers(envs.single_action_space.n, size=n)
        next_obs, rewards, terminated, truncated, _ = envs.step(actions)
        rb.add(next_obs[:, -1], starting, actions, rewards, terminated, truncated)
        for i in range(n):
            frames[i].append((next_obs[i], bool(starting[i])))
            if not starting[i]:
                transitions[i].append((obs[i], actions[i], rewards[i], terminated[i], truncated[i], next_obs[i]))
        starting = terminated | truncated
        obs = next_obs
    return frames, transitions


def retained(frames, slots):
    """Transitions a ring of `slots` frames must still offer: a next frame in the window, and the
    whole stack of earlier frames of the episode (up to 3) in the window too."""
    window = frames[-slots:]
    keep, history = [], 0
    for i, (stack, first) in enumerate(window):
        history = 0 if first else min(history + 1, STACK - 1)
        if i + 1 < len(window) and not window[i + 1][1] and history <= i:
            keep.append(stack[-1].tobytes())
    return keep


@pytest.mark.parametrize("num_envs,slots,steps", [(1, 500, 300), (3, 40, 200), (2, 13, 120)])
def test_sampled_transitions_equal_what_the_envs_produced(num_envs, slots, steps):
    envs = make_stamp_envs(num_envs, max_steps=9)  # episodes end by termination and by truncation
    rb = ReplayBuffer(slots * num_envs, num_envs, torch.device("cpu"), seed=1)
    frames, transitions = run_into_buffer(envs, rb, steps)
    by_newest_frame = {t[0][-1].tobytes(): t for env_t in transitions for t in env_t}
    assert any(t[3] for env_t in transitions for t in env_t) and any(t[4] for env_t in transitions for t in env_t)
    if steps > slots:
        assert rb.filled == slots  # the ring has wrapped around

    seen = set()
    for _ in range(300):
        batch = rb.sample(32)
        for j in range(32):
            obs = batch.obs[j].numpy()
            key = obs[-1].tobytes()
            assert key in by_newest_frame, "sampled a stack no env produced"
            env_obs, action, reward, terminated, truncated, env_next = by_newest_frame[key]
            np.testing.assert_array_equal(obs, env_obs)
            np.testing.assert_array_equal(batch.next_obs[j].numpy(), env_next)
            assert batch.actions[j].item() == action
            assert batch.rewards[j].item() == reward
            assert batch.terminated[j].item() == float(terminated)
            assert batch.truncated[j].item() == float(truncated)
            # no frame of one episode in another episode's stack (pixel 1 is the episode number)
            assert len({(f[0, 0], f[0, 1]) for f in obs}) == 1
            assert len({(f[0, 0], f[0, 1]) for f in batch.next_obs[j].numpy()}) == 1
            seen.add(key)
    expected = {k for i in range(num_envs) for k in retained(frames[i], slots)}
    assert seen == expected  # every transition still in the ring is reachable, and nothing else


def test_stacks_of_real_atari_envs_round_trip():
    """Breakout through the script's own env stack: lives end training episodes, a short time limit truncates."""
    args = Args(env_id="ALE/Breakout-v5", num_envs=2, episodic_life=True, max_episode_steps=40, seed=3)
    envs = make_train_envs(args, run_dir="")
    rb = ReplayBuffer(2 * 150, 2, torch.device("cpu"), seed=0)
    try:
        frames, transitions = run_into_buffer(envs, rb, 260, seed=3)
    finally:
        envs.close()
    flat = [t for env_t in transitions for t in env_t]
    assert any(t[3] for t in flat) and any(t[4] for t in flat)
    known = {(t[0].tobytes(), int(t[1]), float(t[2]), bool(t[3]), bool(t[4]), t[5].tobytes()) for t in flat}
    for _ in range(20):
        b = rb.sample(32)
        for j in range(32):
            item = (b.obs[j].numpy().tobytes(), b.actions[j].item(), b.rewards[j].item(), bool(b.terminated[j]),
                    bool(b.truncated[j]), b.next_obs[j].numpy().tobytes())
            assert item in known


def test_frames_are_stored_once():
    rb = ReplayBuffer(10_000, 2, torch.device("cpu"))
    per_transition = rb.nbytes / 10_000
    assert 84 * 84 <= per_transition <= 84 * 84 * 1.002  # 7,056 bytes of frame + 9 of bookkeeping
    assert ReplayBuffer.bytes_needed(10_000, 2) == rb.nbytes
    assert ReplayBuffer.bytes_needed(1_000_000, 1) <= 7.2e9


def test_sampling_before_any_transition_is_an_error():
    rb = ReplayBuffer(100, 1, torch.device("cpu"))
    rb.start_episodes(np.zeros((1, 84, 84), np.uint8))
    with pytest.raises(RuntimeError, match="no complete transition"):
        rb.sample(4)


def test_the_memory_benchmark_fills_a_buffer_and_round_trips_it_through_a_checkpoint(tmp_path):
    """benchmarks/replay_memory.py (benchmarks/README.md's replay memory tables) runs, on a small buffer: the ring's
    memory is resident from the start, and the buffer written as a checkpoint reads back equal."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "replay_memory.py"), "--buffer-size", "20000",
                           "--num-envs", "2", "--checkpoint", str(tmp_path / "replay.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["bytes_needed"] == ReplayBuffer.bytes_needed(20000, 2) == 20000 * 7065
    assert result["rss_growth_bytes"] >= 0.95 * result["bytes_needed"] and result["loaded_equal"] is True
    assert not (tmp_path / "replay.pt").exists()  # the benchmark deletes what it wrote
