"""The script's own network, loss and update rule learn Q* of a small MDP seen through pixels.

A 5-state, 3-action deterministic MDP with rewards in {-1, 0, 1} (so sign clipping changes
nothing), one terminal transition, gamma = 0.8; Q* comes from value iteration. Each state is
drawn as a bright block at its own place in an 84x84 frame, stacked 4 deep. Minibatches of 32
(s, a) pairs are drawn uniformly, the target network is copied every 25 updates, Adam at
lr 1e-3 (the Atari lr of 6.25e-5 would only make the test slower).

Measured with seed 0 (`pytest -s tests/test_learning.py` prints the counts): k = 0 reaches
the tolerance after 500 updates, k = |A| = 3 after 475; about 20 s each on 2 CPU cores.
"""

import numpy as np
import pytest
import torch

from dqn_atari_meanexp import Args, Batch, QNetwork, make_optimizer, update

N_STATES, N_ACTIONS, GAMMA = 5, 3, 0.8
NEXT = np.array([[1, 2, 0], [2, 3, 0], [3, 4, 1], [4, 0, 2], [4, 4, 3]])  # NEXT[s, a]
REWARD = np.array([[0, 0, -1], [0, 1, -1], [1, 0, 0], [1, -1, 1], [0, 1, 0]], dtype=np.float32)
TERMINAL = np.zeros((N_STATES, N_ACTIONS), bool)
TERMINAL[4, 1] = True  # taking action 1 in state 4 ends the episode
TOLERANCE = 0.1  # max |Q(s, a) - Q*(s, a)| over all pairs; Q* spans about -1 .. 6.7
MAX_UPDATES = 4000


def q_star():
    q = np.zeros((N_STATES, N_ACTIONS))
    for _ in range(1000):
        q = REWARD + GAMMA * (1 - TERMINAL) * q.max(axis=1)[NEXT]
    return q


def render(states):
    frames = np.zeros((len(states), 4, 84, 84), np.uint8)
    for i, s in enumerate(states):
        frames[i, :, 10 + 14 * s: 22 + 14 * s, 20:60] = 255
    return torch.from_numpy(frames)


@pytest.mark.parametrize("k", [0.0, float(N_ACTIONS)])
def test_converges_to_q_star(k):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    args = Args(gamma=GAMMA, learning_rate=1e-3)
    q_network, target_network = QNetwork(N_ACTIONS, k), QNetwork(N_ACTIONS, k)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = make_optimizer(args, q_network)
    expected = torch.tensor(q_star(), dtype=torch.float32)
    all_states = render(range(N_STATES))

    for n in range(1, MAX_UPDATES + 1):
        s = rng.integers(N_STATES, size=32)
        a = rng.integers(N_ACTIONS, size=32)
        batch = Batch(obs=render(s), actions=torch.from_numpy(a), rewards=torch.from_numpy(REWARD[s, a]),
                      next_obs=render(NEXT[s, a]), terminated=torch.from_numpy(TERMINAL[s, a].astype(np.float32)),
                      truncated=torch.zeros(32))
        update(q_network, target_network, optimizer, batch, args)
        if n % 25 == 0:
            target_network.load_state_dict(q_network.state_dict())
            with torch.no_grad():
                error = (q_network(all_states) - expected).abs().max().item()
            if error < TOLERANCE:
                break
    print(f"k={k:g}: max |Q - Q*| = {error:.4f} after {n} updates")
    assert error < TOLERANCE, f"k={k:g}: max |Q - Q*| = {error:.3f} after {n} updates"
    # the greedy policy is optimal (state 0 has two optimal actions: either will do)
    greedy = q_network(all_states).argmax(1)
    assert torch.equal(expected[torch.arange(N_STATES), greedy], expected.max(1).values)
