"""DQN with a mean-expansion head on Atari: one file, read top to bottom.

    python dqn_atari_meanexp.py --env-id ALE/Breakout-v5              # mean-expansion, k = |A|
    python dqn_atari_meanexp.py --env-id ALE/Breakout-v5 --me-coef 0  # plain DQN

The mean-expansion layer ("Accelerating Q-learning through Efficient Value-Sharing across Actions", Nagarajan
et al., ICML 2026) turns the network's raw output u into Q(s, a) = u(s, a) + k * mean_b u(s, b), so every TD
update on one action also moves the value shared by all actions of that state. It is the function
`mean_expansion` below and the last line of `QNetwork.forward`; everything else is DQN as the paper's authors
ran it (defaults = their protocol, see README.md). The paper's other rows are flags: --optimizer rmsprop
--loss huber (the Nature DQN's), --network dueling, --network rdq --loss mse.

How to read this script, top to bottom: Args (every flag; the defaults are the paper's protocol); the mean-expansion
head and the networks; the environment; the replay buffer; the loss and the update; evaluation; the training loop
(`main` and `train`: act, step, store, learn, sync the target, log, evaluate). The last section, the long-run
machinery (flag checks, checkpoints and exact resume, signals, the run directory), can be skipped on a first reading.
"""

import atexit
import collections
import copy
import dataclasses
import difflib
import importlib.util
import json
import os
import pickle
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import ale_py
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from stable_baselines3.common.atari_wrappers import EpisodicLifeEnv, FireResetEnv, MaxAndSkipEnv, NoopResetEnv, WarpFrame
from torch.utils.tensorboard import SummaryWriter

gym.register_envs(ale_py)  # makes the ALE/... and ...NoFrameskip-v4 ids known to gymnasium

ALGO = "dqn"
PAPER_OPTIMIZER_SETTINGS = {"adam": (6.25e-5, 1.5e-4), "rmsprop": (2.5e-4, 0.01)}  # (learning rate, eps)


@dataclass
class Args:
    exp_name: str = "dqn_atari_meanexp"
    """the name of this experiment (part of the run name)"""
    run_name: Optional[str] = None
    """the run directory under runs/; default {env}__{exp_name}__k{k}__{seed}__{unix time}"""
    seed: int = 1
    """seed of the experiment (training envs use seed..seed+N-1, the evaluation env 2^31 - 1 - seed, as the authors')"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    compile: bool = False
    """if toggled, compile the networks with torch.compile: faster updates and acting after some seconds of compiling
    (numerics differ from eager mode at the float-rounding level; see benchmarks/README.md)"""
    capture_video: bool = False
    """whether to capture videos of the agent's games (first training env) into runs/{run_name}/videos"""
    save_model: bool = False
    """whether to save the final and the best network to runs/{run_name}/"""
    track: bool = False
    """if toggled, track the run with Weights & Biases (pip install wandb); WANDB_MODE=offline writes it locally"""
    wandb_project_name: str = "meanexp-atari"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team or user; default: your own)"""
    wandb_group: Optional[str] = None
    """the wandb group the run joins (run_all.sh gives each batch one)"""

    # Environment: the defaults are the paper's protocol (README.md shows CleanRL's)
    env_id: str = "ALE/Breakout-v5"
    """the gymnasium ALE id of the game (ALE/Breakout-v5, or BreakoutNoFrameskip-v4)"""
    sticky_action_prob: float = 0.25
    """probability that the emulator repeats the previous action each frame (sticky actions)"""
    full_action_space: bool = True
    """use the full 18-action set (False: the game's minimal action set)"""
    episodic_life: bool = False
    """if toggled, a lost life ends the training episode (evaluation always plays whole games)"""
    fire_reset: bool = False
    """if toggled, press FIRE after each reset in games that need it"""
    noop_max: int = 0
    """at most this many no-op frames at the start of each episode (0: none, as the authors' code; DQN papers often use 30)"""
    frame_skip: int = 4
    """emulator frames per agent step (the action repeats, the observation is the max of the last two frames)"""
    max_episode_steps: int = 27_000
    """an episode is truncated after this many agent steps (27,000 steps = 108,000 frames)"""

    # Algorithm
    me_coef: Optional[float] = None
    """the mean-expansion coefficient k; default |A| with --network nature, 0 with dueling and rdq; 0 is plain DQN"""
    network: Literal["nature", "dueling", "rdq"] = "nature"
    """nature (Nature CNN), dueling (Q = V + A - mean A) or rdq (regularized dueling: Q = V + A, penalty on V and A);
    the paper ran dueling and rdq with k = 0 only (an explicit k > 0 applies the layer to their Q)"""
    loss: Literal["sse", "mse", "huber"] = "sse"
    """TD loss on the batch: sse (sum of delta^2 / 2, the paper's), mse (mean of delta^2 / 2), huber (sum of Huber(delta))"""
    optimizer: Literal["adam", "rmsprop"] = "adam"
    """adam, or rmsprop (the Nature DQN's: centered, squared-gradient decay 0.95, eps inside the square root)"""
    rdq_penalty: float = 1e-3
    """beta, the weight of RDQ's penalty on V and A (--network rdq only)"""
    total_timesteps: int = 50_000_000
    """total agent steps (summed over all envs)"""
    learning_rate: Optional[float] = None
    """the optimizer's learning rate; default the paper's: Adam 6.25e-5, RMSprop 2.5e-4"""
    optimizer_eps: Optional[float] = None
    """the optimizer's epsilon; default the paper's: Adam 1.5e-4, RMSprop 0.01 (inside the square root)"""
    num_envs: int = 1
    """the number of parallel game environments"""
    buffer_size: int = 1_000_000
    """the replay memory size in transitions (frames stored once each)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    target_network_frequency: int = 10_000
    """agent steps between hard copies of the online network into the target network"""
    batch_size: int = 32
    """the batch size of sample from the replay memory"""
    start_e: float = 1.0
    """the starting epsilon for exploration"""
    end_e: float = 0.01
    """the ending epsilon for exploration"""
    exploration_steps: int = 1_000_000
    """agent steps over which epsilon decays linearly from start-e to end-e"""
    learning_starts: int = 50_000
    """agent steps of experience collected before learning starts"""
    train_frequency: int = 4
    """agent steps per gradient update (kept per agent step whatever --num-envs is)"""

    # Evaluation and logging
    eval_interval: int = 250_000
    """agent steps between evaluations (0: no periodic evaluation)"""
    eval_steps: int = 125_000
    """agent steps per periodic evaluation (only whole episodes are scored)"""
    eval_epsilon: float = 0.001
    """epsilon of the epsilon-greedy policy during evaluation"""
    final_eval_episodes: int = 30
    """episodes the best network plays at the end (written to final_eval.json)"""
    log_interval: int = 1_000
    """agent steps between TensorBoard points of losses and metrics"""
    progress_interval: float = 30.0
    """seconds between console progress lines"""

    # Checkpoints: a long run survives preemption and time limits (README.md, "Long runs")
    checkpoint_interval: int = 1_000_000
    """agent steps between checkpoints to runs/{run_name}/checkpoint.pt (0: only at the start, the end and on a signal)"""
    checkpoint_buffer: bool = True
    """whether checkpoints hold the replay buffer (7 GB when full); without it a resumed run refills it before learning"""
    resume: Optional[str] = None
    """a run directory to continue from its checkpoint, with the run's own settings (only a few flags may change)"""
    eval_model: Optional[str] = None
    """instead of training: a .cleanrl_model saved by --save-model plays --final-eval-episodes games with its run's
    settings (config.json beside it; flags given override them) and writes the final evaluation's statistics"""

    def __post_init__(self):  # the learning rate and eps not given are the paper's for the chosen optimizer
        learning_rate, eps = PAPER_OPTIMIZER_SETTINGS[self.optimizer]
        self.learning_rate = learning_rate if self.learning_rate is None else self.learning_rate
        self.optimizer_eps = eps if self.optimizer_eps is None else self.optimizer_eps


FIXED_SETTINGS = {}  # what config.json records of the algorithm besides the flags (DQN: all are flags)


# ===========================================================================
# The mean-expansion head and the networks
# ===========================================================================


def mean_expansion(values: torch.Tensor, coef: float) -> torch.Tensor:
    """Q = u + k * mean_b u(b) over the last (action) dimension. k = 0 is the identity."""
    return values + coef * values.mean(dim=-1, keepdim=True)


def pfrl_init(layer: nn.Module, bias: float) -> nn.Module:
    """PFRL's initialization, which the authors' DQN networks use: LeCun-normal weights (std 1/sqrt(fan_in)), constant bias."""
    nn.init.normal_(layer.weight, std=layer.weight[0].numel() ** -0.5)  # weight[0]: the inputs of one output unit
    nn.init.constant_(layer.bias, bias)
    return layer


def nature_convolutions(bias: float) -> list:
    """The Nature DQN's torso: (batch, 4, 84, 84) frames in [0, 1] -> (batch, 3136) features."""
    return [pfrl_init(nn.Conv2d(4, 32, 8, stride=4), bias), nn.ReLU(),
            pfrl_init(nn.Conv2d(32, 64, 4, stride=2), bias), nn.ReLU(),
            pfrl_init(nn.Conv2d(64, 64, 3, stride=1), bias), nn.ReLU(),
            nn.Flatten()]


class QNetwork(nn.Module):
    """Nature CNN -> Linear(512, |A|) raw values u -> mean-expansion -> Q."""

    def __init__(self, n_actions: int, me_coef: float):
        super().__init__()
        self.me_coef = me_coef
        self.network = nn.Sequential(*nature_convolutions(bias=0.1), pfrl_init(nn.Linear(3136, 512), bias=0.1), nn.ReLU(),
                                     pfrl_init(nn.Linear(512, n_actions), bias=0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.network(x.float() / 255.0)  # x: uint8 frames (batch, 4, 84, 84)
        return mean_expansion(u, self.me_coef)

    def q_values(self, x: torch.Tensor) -> torch.Tensor:
        """Q(s, .) for act() and evaluate() (IQN's network averages sampled taus here); via __call__, so --compile applies."""
        return self(x)


class DuelingNetwork(nn.Module):
    """The paper's baselines. Dueling DQN (Wang et al. 2016): Q = V + A - mean_b A(b). RDQ (regularized=True;
    Daley et al.): Q = V + A, and the loss penalizes V and A instead (td_loss). Nature convolutions (bias 0.03),
    then two streams of Linear(3136, 512) + ReLU -> Linear(512, 1) for V and Linear(512, |A|) for A."""

    def __init__(self, n_actions: int, me_coef: float, regularized: bool):
        super().__init__()
        self.me_coef, self.regularized = me_coef, regularized
        self.torso = nn.Sequential(*nature_convolutions(bias=0.03))
        self.value = nn.Sequential(pfrl_init(nn.Linear(3136, 512), 0.0), nn.ReLU(), pfrl_init(nn.Linear(512, 1), 0.0))
        self.advantage = nn.Sequential(pfrl_init(nn.Linear(3136, 512), 0.0), nn.ReLU(),
                                       pfrl_init(nn.Linear(512, n_actions), 0.0))

    def streams(self, x: torch.Tensor) -> tuple:
        """V (batch, 1) and A (batch, |A|) of uint8 frames (batch, 4, 84, 84)."""
        h = self.torso(x.float() / 255.0)
        return self.value(h), self.advantage(h)

    def combine(self, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        q = v + a if self.regularized else v + a - a.mean(dim=-1, keepdim=True)
        return mean_expansion(q, self.me_coef)  # the identity at k = 0, the paper's setting for these baselines

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(*self.streams(x))

    def q_values(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


def make_network(args: Args, n_actions: int, me_coef: float) -> nn.Module:
    """Builds the network the run trains: its class is chosen here and nowhere else."""
    if args.network == "nature":
        return QNetwork(n_actions, me_coef)
    return DuelingNetwork(n_actions, me_coef, regularized=args.network == "rdq")


def default_me_coef(args: Args, n_actions: int) -> float:
    """k when --me-coef is not given: |A| for the paper's IB-DQN, 0 for its dueling and RDQ baselines."""
    return float(n_actions if args.network == "nature" else 0)


# ===========================================================================
# Environment: gymnasium + ale-py, preprocessed with Stable-Baselines3's Atari wrappers
# ===========================================================================


def make_env(args: Args, seed: int, capture_video: bool = False, run_dir: str = "", evaluation: bool = False):
    """Returns a thunk building one preprocessed env: 84x84 grayscale frames, stacked 4 deep.

    Rewards stay raw (the learner clips them to their sign), so logged returns are game scores.
    """

    def thunk():
        env = gym.make(
            args.env_id,
            frameskip=1,  # frame skipping (with max-pooling) is done by MaxAndSkipEnv below
            repeat_action_probability=0.0,  # sticky actions come from StickyAction below
            full_action_space=args.full_action_space,
            max_num_frames_per_episode=0,  # no ALE frame limit: TimeLimit below counts agent steps
            render_mode="rgb_array" if capture_video else None,
        )
        # sticky actions per frame, as ALE's own (Machado et al. 2018), but in a wrapper: the action it repeats is
        # Python state that a checkpoint saves (ALE's is not)
        if args.sticky_action_prob > 0:
            env = gym.wrappers.StickyAction(env, args.sticky_action_prob)
        if capture_video:
            env = gym.wrappers.RecordVideo(env, os.path.join(run_dir, "videos"))
        if args.noop_max > 0:
            env = NoopResetEnv(env, noop_max=args.noop_max)
        env = MaxAndSkipEnv(env, skip=args.frame_skip)
        env = gym.wrappers.TimeLimit(env, max_episode_steps=args.max_episode_steps)  # truncation, not termination
        env = gym.wrappers.RecordEpisodeStatistics(env)  # whole-game raw score and length, in info["episode"]
        if args.episodic_life and not evaluation:
            env = EpisodicLifeEnv(env)
        if args.fire_reset and "FIRE" in env.unwrapped.get_action_meanings():
            env = FireResetEnv(env)
            if evaluation or not args.episodic_life:  # a lost life does not end the episode: launch the ball there too
                env = FireAfterLifeLoss(env)
        env = WarpFrame(env)  # 84x84 grayscale, shape (84, 84, 1)
        env = gym.wrappers.ReshapeObservation(env, (84, 84))
        env = gym.wrappers.FrameStackObservation(env, 4)  # (4, 84, 84); an episode's first frame pads its first stacks
        env = SnapshotEnv(env)
        env.action_space.seed(seed)  # the games themselves are seeded by the first reset(seed=...)
        return env

    return thunk


class FireAfterLifeLoss(gym.Wrapper):
    """--fire-reset where a lost life does not end the episode: plays, after every lost life, what training with
    --episodic-life plays then (EpisodicLifeEnv's no-op, FireResetEnv's FIRE and its next move), inside the step
    that lost it. Without it the ball waits for a FIRE that an agent trained with automatic FIRE never learned."""

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.lives = self.env.unwrapped.ale.lives()
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        lives = self.env.unwrapped.ale.lives()
        if 0 < lives < self.lives:
            for launch in (0, 1, 2):  # NOOP, FIRE, then the move FireResetEnv makes after FIRE
                if terminated or truncated:
                    break
                obs, launch_reward, terminated, truncated, info = self.env.step(launch)
                reward += launch_reward  # the game's score: these steps are part of the game
        self.lives = self.env.unwrapped.ale.lives()
        return obs, reward, terminated, truncated, info


def make_train_envs(args: Args, run_dir: str):
    """N training envs stepped together. Autoreset is NEXT_STEP: the step after an episode ends
    returns the new episode's first observation (its action is ignored) instead of a transition."""
    thunks = [make_env(args, args.seed + i, args.capture_video and i == 0, run_dir) for i in range(args.num_envs)]
    if args.num_envs == 1:
        return gym.vector.SyncVectorEnv(thunks, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    thunks = [leave_signals_to_main_process(thunk) for thunk in thunks]
    return gym.vector.AsyncVectorEnv(thunks, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


def make_eval_env(args: Args, capture_video: bool = False, video_dir: str = ""):
    """The evaluation env and the generator of its epsilon draws, both seeded 2^31 - 1 - seed (the authors' seed)."""
    seed = 2**31 - 1 - args.seed
    env = make_env(args, seed, capture_video, video_dir, evaluation=True)()
    env.reset(seed=seed)  # seeds the eval games once; later resets continue its RNG
    return env, np.random.default_rng(seed)


# ===========================================================================
# Replay buffer: each 84x84 frame stored once, 4-frame stacks rebuilt when sampling
# ===========================================================================


class Batch(NamedTuple):
    obs: torch.Tensor  # uint8 (B, 4, 84, 84)
    actions: torch.Tensor  # int64 (B,)
    rewards: torch.Tensor  # float32 (B,), raw game reward
    next_obs: torch.Tensor  # uint8 (B, 4, 84, 84)
    terminated: torch.Tensor  # float32 (B,), 1 where the episode truly ended (no bootstrap)
    truncated: torch.Tensor  # float32 (B,), 1 where a time limit cut the episode (still bootstraps)


class ReplayBuffer:
    """A ring of frames per env. Slot k holds the newest frame of the observation at step k and
    the transition taken from it; the next observation is the stack ending at slot k + 1.

    When an episode ends, its final frame takes a slot of its own (needed to bootstrap a
    truncation) and the next episode starts in the slot after. `history[k]` counts the earlier
    frames of k's episode (capped at 3), so a stack never reaches into another episode: like
    FrameStackObservation, the episode's first frame repeats instead.
    """

    STACK = 4
    MIN_SLOTS_PER_ENV = 2 * STACK  # a smaller ring could hold no whole transition after wrapping
    # per-slot bookkeeping besides the frame (actions: Atari has at most 18; valid: a sampleable transition starts
    # here, its next frame stored and its stack intact)
    FIELDS = {"actions": np.uint8, "rewards": np.float32, "terminated": np.bool_, "truncated": np.bool_, "history": np.uint8,
              "valid": np.bool_}

    @classmethod
    def bytes_needed(cls, capacity: int, num_envs: int, frame_shape=(84, 84)) -> int:
        slots = (capacity // num_envs) * num_envs
        per_slot = int(np.prod(frame_shape)) + sum(np.dtype(t).itemsize for t in cls.FIELDS.values())
        return slots * per_slot

    def __init__(self, capacity: int, num_envs: int, device: torch.device, seed: int = 0, frame_shape=(84, 84)):
        self.num_envs, self.slots, self.device = num_envs, capacity // num_envs, device
        self.frames = np.zeros((num_envs, self.slots, *frame_shape), dtype=np.uint8)
        for name, dtype in self.FIELDS.items():
            setattr(self, name, np.zeros((num_envs, self.slots), dtype=dtype))
        self.cursor = 0  # every env writes one frame per add(), so all rings share one write position
        self.filled = 0
        self.rng = np.random.default_rng(seed)
        self._env_index = np.arange(num_envs)
        self._stack_back = np.arange(self.STACK - 1, -1, -1)  # how far back each stack position looks: 3, 2, 1, 0

    @property
    def nbytes(self) -> int:
        return self.frames.nbytes + sum(getattr(self, name).nbytes for name in self.FIELDS)

    def add(self, frames, first, actions, rewards, terminated, truncated):
        """Stores the newest frame of every env's observation.

        first[i]: env i's frame starts an episode (reset), so no transition leads to it;
        otherwise the transition (previous frame, actions[i], rewards[i], terminated[i],
        truncated[i]) leads from env i's previous slot to this frame.
        """
        e, c, p = self._env_index, self.cursor, (self.cursor - 1) % self.slots
        cont = ~np.asarray(first, dtype=bool)
        self.actions[cont, p] = np.asarray(actions)[cont]
        self.rewards[cont, p] = np.asarray(rewards)[cont]
        self.terminated[cont, p] = np.asarray(terminated)[cont]
        self.truncated[cont, p] = np.asarray(truncated)[cont]
        self.valid[cont, p] = True
        self.frames[:, c] = frames
        self.history[:, c] = np.where(cont, np.minimum(self.history[:, p] + 1, self.STACK - 1), 0)
        self.valid[:, c] = False  # its transition is not known until the next frame arrives
        for back in range(1, self.STACK):  # overwriting slot c breaks the oldest stacks that reach back to it
            q = (c + back) % self.slots
            self.valid[e, q] &= self.history[e, q] < back
        self.cursor = (c + 1) % self.slots
        self.filled = min(self.filled + 1, self.slots)

    def start_episodes(self, frames):
        """Stores every env's first frame of a new episode (a fresh run, or a resume without the saved buffer)."""
        zeros = np.zeros(self.num_envs)
        self.add(frames, np.ones(self.num_envs, dtype=bool), zeros, zeros, zeros, zeros)

    def state_dict(self) -> dict:
        """The filled part of every ring, as tensors that share the arrays' memory: no copy, however large."""
        arrays = {name: [torch.from_numpy(getattr(self, name)[e, : self.filled]) for e in range(self.num_envs)]
                  for name in ("frames", *self.FIELDS)}
        return {"cursor": self.cursor, "filled": self.filled, "rng": self.rng.bit_generator.state, **arrays}

    def load_state_dict(self, state: dict):
        for name in ("frames", *self.FIELDS):
            for e, part in enumerate(state[name]):
                getattr(self, name)[e, : len(part)] = part.numpy()
        self.cursor, self.filled = state["cursor"], state["filled"]
        self.rng.bit_generator.state = state["rng"]

    def _stacks(self, env, slot):
        back = np.minimum(self._stack_back[None, :], self.history[env, slot][:, None])  # (B, 4)
        return self.frames[env[:, None], (slot[:, None] - back) % self.slots]  # (B, 4, 84, 84)

    def sample(self, batch_size: int) -> Batch:
        if not self.valid.any():
            raise RuntimeError("the replay buffer holds no complete transition yet")
        env = self.rng.integers(self.num_envs, size=batch_size)
        slot = self.rng.integers(self.filled, size=batch_size)
        bad = ~self.valid[env, slot]
        while bad.any():  # rejection sampling keeps the draw uniform over valid transitions
            env[bad] = self.rng.integers(self.num_envs, size=bad.sum())
            slot[bad] = self.rng.integers(self.filled, size=bad.sum())
            bad = ~self.valid[env, slot]
        next_slot = (slot + 1) % self.slots
        to = lambda a: torch.from_numpy(a).to(self.device, non_blocking=True)  # noqa: E731
        return Batch(
            obs=to(self._stacks(env, slot)),
            actions=to(self.actions[env, slot].astype(np.int64)),
            rewards=to(self.rewards[env, slot]),
            next_obs=to(self._stacks(env, next_slot)),
            terminated=to(self.terminated[env, slot].astype(np.float32)),
            truncated=to(self.truncated[env, slot].astype(np.float32)),
        )


# ===========================================================================
# Loss and update: the learning algorithm itself, which the mean-expansion head does not change
# ===========================================================================


def action_gap(q: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of (largest Q - second largest Q)."""
    top2 = q.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]).mean()


def td_error_loss(q_taken: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """The loss on the batch's TD errors delta = y - Q(s, a), as PFRL computes it (--loss)."""
    if kind == "sse":  # the paper's: a sum, so its gradient is batch-size times mse's (which changes what Adam's eps means)
        return F.mse_loss(q_taken, target, reduction="sum") / 2
    if kind == "mse":
        return F.mse_loss(q_taken, target) / 2
    return F.smooth_l1_loss(q_taken, target, reduction="sum")  # huber: 0.5 delta^2 where |delta| <= 1, else |delta| - 0.5


def td_loss(q_network: nn.Module, target_network: nn.Module, batch: Batch, args: Args):
    """--loss of Q(s, a) against r + gamma * max_a' Q_target(s', a'), plus RDQ's penalty with --network rdq.

    Rewards are clipped to their sign; a truncated episode bootstraps, a terminated one does not.
    Returns (loss, Q(s, .) of the online network).
    """
    with torch.no_grad():
        next_q = target_network(batch.next_obs).max(dim=1).values
        target = torch.sign(batch.rewards) + args.gamma * (1.0 - batch.terminated) * next_q
    if args.network == "rdq":  # RDQ: beta * mean over the batch of (V(s)^2 + sum_b A(s, b)^2) / 2, from the same pass as Q
        v, a = q_network.streams(batch.obs)
        q = q_network.combine(v, a)
        penalty = args.rdq_penalty * (v.squeeze(1) ** 2 + (a**2).sum(dim=1)).mean() / 2
    else:
        q, penalty = q_network(batch.obs), 0.0
    q_taken = q.gather(1, batch.actions[:, None]).squeeze(1)
    return td_error_loss(q_taken, target, args.loss) + penalty, q


def update(q_network, target_network, optimizer, batch: Batch, args: Args):
    """One gradient step. Returns (loss, mean Q of the taken actions, action gap), all still on the device."""
    loss, q = td_loss(q_network, target_network, batch, args)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    q = q.detach()
    return loss.detach(), q.gather(1, batch.actions[:, None]).mean(), action_gap(q)


class CenteredRMSprop(torch.optim.Optimizer):
    """The Nature DQN's RMSprop (PFRL's RMSpropEpsInsideSqrt, centered, no momentum), per parameter:

        m = alpha m + (1 - alpha) g;  s = alpha s + (1 - alpha) g^2;  theta -= lr g / sqrt(s - m^2 + eps)

    torch.optim.RMSprop(centered=True) adds eps outside the square root: another optimizer.
    """

    def __init__(self, params, lr: float, eps: float, alpha: float = 0.95):
        super().__init__(params, dict(lr=lr, eps=eps, alpha=alpha))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, eps, alpha = group["lr"], group["eps"], group["alpha"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # both averages start at 0, with no bias correction
                    state["grad_avg"], state["square_avg"] = torch.zeros_like(p), torch.zeros_like(p)
                m, s = state["grad_avg"], state["square_avg"]
                m.mul_(alpha).add_(p.grad, alpha=1 - alpha)
                s.mul_(alpha).addcmul_(p.grad, p.grad, value=1 - alpha)
                p.addcdiv_(p.grad, (s - m * m + eps).sqrt(), value=-lr)


def make_optimizer(args: Args, network: nn.Module) -> torch.optim.Optimizer:
    if args.optimizer == "rmsprop":
        return CenteredRMSprop(network.parameters(), lr=args.learning_rate, eps=args.optimizer_eps)
    # fused: the same Adam, one kernel for all parameters instead of a loop over them (12x faster on CPU, benchmarks/)
    return torch.optim.Adam(network.parameters(), lr=args.learning_rate, eps=args.optimizer_eps, fused=True)


# ===========================================================================
# Evaluation: raw game scores and the authors' overestimation, on an env of its own
# ===========================================================================


def discounted_returns(rewards, gamma: float, bootstrap: float = 0.0) -> np.ndarray:
    """G_t = r_t + gamma * G_{t+1} for every step t of one episode, from G_T = bootstrap after its last step."""
    returns, g = np.zeros(len(rewards)), bootstrap
    for t in range(len(rewards) - 1, -1, -1):
        g = rewards[t] + gamma * g
        returns[t] = g
    return returns


def episode_statistics(q, rewards, gamma: float, bootstrap: float) -> dict:
    """The authors' statistics of one evaluation episode (PAPER.md, "Metrics"): q[t] = Q(s_t, a_t) of the greedy
    action, rewards sign-clipped, bootstrap = Q(s_T, greedy action) where the episode was cut, 0 where it ended."""
    q, returns = np.asarray(q, dtype=np.float64), discounted_returns(rewards, gamma, bootstrap)
    error = q - returns
    return {"overestimation": error.mean(), "normalized_overestimation": error.mean() / abs(q.mean()), "mean_q": q.mean(),
            "mean_return": returns.mean(),  # the bootstrapped G_t the overestimation is measured against, mean over steps
            "mean_discounted_return": discounted_returns(rewards, gamma)[0]}  # G_0 without the bootstrap


EVAL_STATISTICS = ("overestimation", "normalized_overestimation", "mean_q", "mean_return", "mean_discounted_return")
EVAL_LOGGED = EVAL_STATISTICS + ("truncated_episodes",)  # what TensorBoard and final_eval.json get besides the scores


@torch.no_grad()
def evaluate(network, env, device, epsilon: float, gamma: float, rng, max_steps=None, max_episodes=None) -> dict:
    """Plays until max_steps agent steps or max_episodes episodes; with probability epsilon a random action
    replaces the greedy one.

    Scores are the raw game scores of the finished episodes (of the unfinished one where none finished, as
    PFRL does). The Q statistics of episode_statistics are averaged over the finished episodes (None where
    none finished); `truncated_episodes` counts those a time limit cut.
    """

    def greedy(obs):
        """(the greedy action, its Q). Two estimates of Q(s, .) in one call: where Q is itself sampled (IQN's taus),
        recording the estimate that picked the action would bias the recorded Q upward (a winner's curse). Where Q is
        not sampled (DQN) the two rows are equal, and the code stays the same in both scripts."""
        obs_t = torch.as_tensor(obs, device=device)
        q_act, q_record = network.q_values(obs_t[None].expand(2, *obs_t.shape)).cpu().numpy()
        action = int(q_act.argmax())
        return action, float(q_record[action])

    network.eval()
    finished, truncated_episodes = [], 0  # finished: (score, length, statistics) per episode
    q, clipped, raw = [], [], []  # the current episode: Q(s_t, greedy a_t), sign-clipped and raw rewards
    obs, steps = env.reset()[0], 0
    while not ((max_episodes is not None and len(finished) >= max_episodes) or (max_steps is not None and steps >= max_steps)):
        action, q_value = greedy(obs)  # Q is recorded for the greedy action, before epsilon may replace it
        if rng.random() < epsilon:
            action = int(rng.integers(env.action_space.n))
        obs, reward, terminated, truncated, _ = env.step(action)
        steps += 1
        q.append(q_value)
        clipped.append(np.sign(reward))
        raw.append(float(reward))
        if terminated or truncated:
            bootstrap = 0.0 if terminated else greedy(obs)[1]  # a cut episode's return goes on beyond its last step
            finished.append((sum(raw), len(raw), episode_statistics(q, clipped, gamma, bootstrap)))
            truncated_episodes += int(not terminated)
            q, clipped, raw = [], [], []
            obs = env.reset()[0]
    network.train()
    scores, lengths = [s for s, _, _ in finished] or [sum(raw)], [n for _, n, _ in finished] or [len(raw)]
    stats = {key: float(np.mean([e[key] for _, _, e in finished])) if finished else None for key in EVAL_STATISTICS}
    return {"scores": scores, "lengths": lengths, "steps": steps, "truncated_episodes": truncated_episodes, **stats}


def final_statistics(result: dict) -> dict:
    """What final_eval.json (and --eval-model) report of an evaluation: the games' scores and the Q statistics."""
    scores = result["scores"]
    return {"episodes": len(scores), "scores": scores, "lengths": result["lengths"], "mean": float(np.mean(scores)),
            "median": float(np.median(scores)), "std": float(np.std(scores)),
            **{key: result[key] for key in EVAL_LOGGED}}


# ===========================================================================
# The training loop
# ===========================================================================


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    if duration <= 0:
        return end_e
    return start_e + (end_e - start_e) * min(t / duration, 1.0)


def crossed(before: int, after: int, interval: int) -> int:
    """How many multiples of interval lie in (before, after]: an event every `interval` steps is due. (With N envs
    the step count jumps by up to N, so `step % interval == 0` could skip a multiple.)"""
    return after // interval - before // interval if interval > 0 else 0


@dataclass
class LoopState:
    """Everything the training loop carries from one step to the next: a checkpoint saves it, a resume restores it."""

    obs: np.ndarray  # the envs' current observations (num_envs, 4, 84, 84)
    starting: np.ndarray  # envs whose next step() is an autoreset, not a transition
    sums: torch.Tensor  # loss, Q, action gap summed on the device between log points
    bad_step: torch.Tensor  # the first step whose loss or Q was not finite (-1: none), read at log points
    # (step, updates by then): no update until that step (--learning-starts, or the refill of a resume without the
    # buffer), then one per --train-frequency agent steps
    update_origin: tuple
    global_step: int = 0
    updates: int = 0
    logged_updates: int = 0  # the updates up to the last log point
    episodes: int = 0
    evaluations: int = 0
    recent_returns: list = dataclasses.field(default_factory=list)  # the last 20 training scores, for the progress line
    best_score: float = -float("inf")  # the best periodic evaluation: the final evaluation plays its network
    best_state: Optional[dict] = None
    best_step: Optional[int] = None


@dataclass
class Parts:
    """What the loop works with besides its state (a checkpoint holds these too)."""

    q_network: nn.Module
    target_network: nn.Module
    optimizer: torch.optim.Optimizer
    rb: ReplayBuffer
    envs: gym.vector.VectorEnv
    eval_env: gym.Env
    rng: np.random.Generator  # exploration draws
    eval_rng: np.random.Generator  # the evaluation's epsilon draws


def main(args: Args):
    """Trains, evaluates and writes the run. Takes the Args of parse_args(): with --resume, its settings are the run's."""
    if args.eval_model is not None:
        return evaluate_saved_model(args)  # no training: the machinery at the end
    run = Run.start(args)  # checks, seeds, device, |A| and k, run directory, TensorBoard, signals: the machinery
    if run is None:
        return  # a finished run: nothing to do
    q_network = make_network(args, run.n_actions, run.me_coef).to(run.device)
    target_network = copy.deepcopy(q_network)
    if args.compile:  # in place: state_dicts keep their keys; one static graph per batch shape (acting, evaluation, training)
        q_network.compile(dynamic=False)
        target_network.compile(dynamic=False)
    envs = make_train_envs(args, run.dir)
    atexit.register(envs.close)  # however the run ends: the workers ignore SIGTERM, so only this stops them
    eval_env, eval_rng = make_eval_env(args)
    rb = ReplayBuffer(args.buffer_size, args.num_envs, run.device, seed=args.seed)
    parts = Parts(q_network, target_network, make_optimizer(args, q_network), rb, envs, eval_env,
                  rng=np.random.default_rng(args.seed), eval_rng=eval_rng)
    obs, _ = envs.reset(seed=args.seed)
    state = LoopState(obs, starting=np.zeros(args.num_envs, dtype=bool), sums=torch.zeros(3, device=run.device),
                      bad_step=torch.tensor(-1, device=run.device), update_origin=(args.learning_starts, 0))
    if run.resumed is None:
        rb.start_episodes(obs[:, -1])
    state = run.begin(state, parts)  # a resumed run: the checkpoint's state; a new one: a first checkpoint
    print(f"{ALGO} k={run.me_coef:g} on {args.env_id} ({run.n_actions} actions), {args.num_envs} env(s), "
          f"device {run.device}, logs in {run.dir}")
    train(args, run, parts, state)
    final_evaluation(args, run, parts, state)


def train(args: Args, run: "Run", p: Parts, state: LoopState):
    """Act, step, store, learn, sync the target, log, evaluate, until --total-timesteps (checkpointing on the way)."""
    while state.global_step < args.total_timesteps:
        epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_steps, state.global_step)
        actions = act(p.q_network, state.obs, epsilon, p.rng, run.n_actions, run.device)
        next_obs, rewards, terminated, truncated, infos = p.envs.step(actions)
        # state.starting is still the previous step's: where it is set, this step was an autoreset (no transition)
        p.rb.add(next_obs[:, -1], state.starting, actions, rewards, terminated, truncated)
        before = state.global_step
        state.global_step += int((~state.starting).sum())  # an autoreset step moves no game forward
        state.starting, state.obs = terminated | truncated, next_obs
        record_episodes(run.writer, infos, state)

        learn(args, p, state)
        if crossed(before, state.global_step, args.target_network_frequency):
            p.target_network.load_state_dict(p.q_network.state_dict())
        if crossed(before, state.global_step, args.log_interval):
            log_training(run, p, state, epsilon)
        if crossed(before, state.global_step, args.eval_interval):
            periodic_evaluation(args, run, p, state)
        run.report_progress(state)
        run.checkpoint_when_due(before, state, p)
    run.end_training(state, p)


def act(q_network: nn.Module, obs: np.ndarray, epsilon: float, rng, n_actions: int, device) -> np.ndarray:
    """Epsilon-greedy, one coin per env; the network runs only when some env acts greedily."""
    actions = rng.integers(n_actions, size=len(obs))
    greedy = rng.random(len(obs)) >= epsilon
    if greedy.any():
        with torch.no_grad():
            q = q_network.q_values(torch.as_tensor(obs, device=device))
        actions = np.where(greedy, q.argmax(dim=1).cpu().numpy(), actions)
    return actions


def record_episodes(writer: SummaryWriter, infos: dict, state: LoopState):
    """Logs the score and length of each training game that ended this step."""
    if "episode" in infos:
        for i in np.flatnonzero(infos["_episode"]):  # gymnasium's mask of the envs whose game ended this step
            writer.add_scalar("charts/episodic_return", infos["episode"]["r"][i], state.global_step)
            writer.add_scalar("charts/episodic_length", infos["episode"]["l"][i], state.global_step)
            state.recent_returns = (state.recent_returns + [float(infos["episode"]["r"][i])])[-20:]
            state.episodes += 1


def learn(args: Args, p: Parts, state: LoopState):
    """The updates now due: updates per agent step stay 1/train_frequency whatever the number of envs."""
    origin_step, origin_updates = state.update_origin
    if state.global_step <= origin_step:  # learning has not started yet
        return
    while state.updates < origin_updates + (state.global_step - origin_step) // args.train_frequency:
        stats = torch.stack(update(p.q_network, p.target_network, p.optimizer, p.rb.sample(args.batch_size), args))
        state.sums += stats
        first_bad = (state.bad_step < 0) & ~stats.isfinite().all()  # on the device: no sync
        state.bad_step = torch.where(first_bad, state.global_step, state.bad_step)
        state.updates += 1


def log_training(run: "Run", p: Parts, state: LoopState, epsilon: float):
    """TensorBoard: means over the updates since the last point, rate, epsilon. Here (.tolist(), check_finite) and
    at checkpoints are the loop's only device syncs."""
    step, writer = state.global_step, run.writer
    if state.updates > state.logged_updates:
        loss, q_mean, gap = (state.sums / (state.updates - state.logged_updates)).tolist()
        run.check_finite(state, p)
        writer.add_scalar("losses/td_loss", loss, step)
        writer.add_scalar("losses/q_values", q_mean, step)
        writer.add_scalar("metrics/action_gap", gap, step)
        state.sums.zero_()
        state.logged_updates = state.updates
    writer.add_scalar("charts/SPS", run.progress.training_rate(step), step)
    writer.add_scalar("charts/epsilon", epsilon, step)
    writer.add_scalar("charts/updates", state.updates, step)


def periodic_evaluation(args: Args, run: "Run", p: Parts, state: LoopState):
    """Evaluates the online network and keeps the best one, which the protocol's final evaluation plays."""
    started = time.time()
    result = evaluate(p.q_network, p.eval_env, run.device, args.eval_epsilon, args.gamma, p.eval_rng,
                      max_steps=args.eval_steps)
    run.progress.eval_time += time.time() - started  # not training time
    state.evaluations += 1
    score = float(np.mean(result["scores"]))
    run.writer.add_scalar("eval/episodic_return", score, state.global_step)
    for key in EVAL_LOGGED:
        if result[key] is not None:  # None: no episode finished within --eval-steps
            run.writer.add_scalar(f"eval/{key}", result[key], state.global_step)
    if score > state.best_score:
        state.best_score, state.best_state, state.best_step = score, copy.deepcopy(p.q_network.state_dict()), state.global_step
    over = "n/a (no episode finished)" if result["overestimation"] is None else f"{result['overestimation']:.3f}"
    print(f"evaluation {state.evaluations} at step {state.global_step:,}: mean score {score:.1f} over "
          f"{len(result['scores'])} episodes, overestimation {over}")


def final_evaluation(args: Args, run: "Run", p: Parts, state: LoopState):
    """The best network (the last one without periodic evaluations) plays --final-eval-episodes games: final_eval.json."""
    if args.save_model:
        torch.save(p.q_network.state_dict(), os.path.join(run.dir, f"{args.exp_name}.cleanrl_model"))
        if state.best_state is not None:
            torch.save(state.best_state, os.path.join(run.dir, f"{args.exp_name}_best.cleanrl_model"))
    use_best = state.best_state is not None
    if use_best:
        p.q_network.load_state_dict(state.best_state)
    result = evaluate(p.q_network, p.eval_env, run.device, args.eval_epsilon, args.gamma, p.eval_rng,
                      max_episodes=args.final_eval_episodes)
    p.eval_env.close()
    run.finish({
        "algo": ALGO, "env_id": args.env_id, "seed": args.seed, "me_coef": run.me_coef, "total_steps": state.global_step,
        "network": f"best periodic evaluation (step {state.best_step})" if use_best else "final",
        "network_step": state.best_step if use_best else state.global_step, "epsilon": args.eval_epsilon,
        **final_statistics(result),
    })


# ===========================================================================
# The long-run machinery: a first reader may skip it. Checking the command line, resuming,
# checkpoints, signals, the run directory and its files
# ===========================================================================


def algo_errors(args: Args) -> list:
    """The checks of this algorithm's own flags (check_args below does the rest)."""
    errors = []
    if not args.rdq_penalty >= 0:
        errors.append(f"--rdq-penalty must be >= 0 (got {args.rdq_penalty})")
    if args.network != "rdq" and args.rdq_penalty != Args.rdq_penalty:
        errors.append(f"--rdq-penalty applies to --network rdq only (this run's network is {args.network})")
    return errors


def check_args(args: Args) -> list:
    """Returns one message per bad setting (empty when all are fine)."""
    errors = []
    if args.env_id not in gym.registry:
        close = difflib.get_close_matches(args.env_id, [i for i in gym.registry if "ALE/" in i or "NoFrameskip-v4" in i])
        hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "use e.g. ALE/Breakout-v5"
        errors.append(f"--env-id {args.env_id!r} is not a registered gymnasium id; {hint}")
    elif "ale_py" not in str(gym.registry[args.env_id].entry_point):
        errors.append(f"--env-id {args.env_id!r} is not an Atari (ale-py) game; use e.g. ALE/Breakout-v5")
    positive = ["total_timesteps", "num_envs", "buffer_size", "batch_size", "target_network_frequency", "train_frequency",
                "frame_skip", "max_episode_steps", "eval_steps", "final_eval_episodes", "log_interval", "learning_rate",
                "optimizer_eps", "progress_interval"]
    non_negative = ["noop_max", "eval_interval", "exploration_steps", "learning_starts", "checkpoint_interval"]
    probabilities = ["start_e", "end_e", "eval_epsilon"]
    for name in positive:
        if not getattr(args, name) > 0:
            errors.append(f"--{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})")
    for name in non_negative:
        if not getattr(args, name) >= 0:
            errors.append(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    for name in probabilities:
        if not 0.0 <= getattr(args, name) <= 1.0:
            errors.append(f"--{name.replace('_', '-')} must be in [0, 1] (got {getattr(args, name)})")
    if not 0.0 <= args.sticky_action_prob < 1.0:
        errors.append(f"--sticky-action-prob must be in [0, 1) (got {args.sticky_action_prob})")
    if not 0.0 < args.gamma <= 1.0:
        errors.append(f"--gamma must be in (0, 1] (got {args.gamma})")
    if args.me_coef is not None and not (0.0 <= args.me_coef < float("inf")):
        errors.append(f"--me-coef must be a finite number >= 0 (got {args.me_coef}); 0 is plain {ALGO.upper()}")
    if args.batch_size > args.learning_starts:
        errors.append(f"--batch-size {args.batch_size} is larger than --learning-starts {args.learning_starts}: "
                      "the first update would sample more transitions than the buffer holds")
    if args.num_envs > 0 and args.buffer_size < ReplayBuffer.MIN_SLOTS_PER_ENV * args.num_envs:
        errors.append(f"--buffer-size {args.buffer_size} is too small for {args.num_envs} envs "
                      f"(at least {ReplayBuffer.MIN_SLOTS_PER_ENV} per env)")
    if args.batch_size > args.buffer_size > 0:
        errors.append(f"--batch-size {args.batch_size} is larger than --buffer-size {args.buffer_size}")
    if args.run_name is not None and (not args.run_name or "/" in args.run_name or args.run_name in (".", "..")):
        errors.append(f"--run-name {args.run_name!r} must be a plain directory name (no '/')")
    if args.capture_video and importlib.util.find_spec("moviepy") is None:
        errors.append("--capture-video needs moviepy: pip install moviepy")
    if args.track and importlib.util.find_spec("wandb") is None:
        errors.append("--track needs wandb: pip install -r requirements-track.txt (README.md, 'Experiment tracking')")
    return errors + algo_errors(args)


RESUME_MAY_CHANGE = ("total_timesteps", "checkpoint_interval", "checkpoint_buffer", "progress_interval", "cuda", "save_model",
                     "compile", "track", "wandb_project_name", "wandb_entity", "wandb_group")


CHECKPOINT = "checkpoint.pt"  # in the run directory


def read_config(run_dir: str) -> Optional[dict]:
    """The settings a run recorded in its config.json, or None where there is no readable one."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and "algo" in config else None


def parse_args(argv=None) -> Args:
    """The command line. With --resume RUN_DIR (or --eval-model RUN_DIR/MODEL), the flags not given take the run's
    saved settings, not the defaults."""
    args = tyro.cli(Args, args=argv)
    run_dir = args.resume
    if args.eval_model is not None:
        run_dir = os.path.dirname(args.eval_model) or "."
    config = read_config(run_dir) if run_dir is not None else None
    if config is None:
        return args  # main() explains what is wrong with --resume; --eval-model without config.json uses the flags
    saved = {field.name: config[field.name] for field in dataclasses.fields(Args) if field.name in config}
    if args.eval_model is not None:
        saved.pop("track", None)  # an evaluation is not tracked
    return tyro.cli(Args, args=argv, default=Args(**{**saved, "resume": args.resume, "eval_model": args.eval_model}))


def check_resume(args: Args) -> list:
    """Returns one message per reason --resume cannot continue the run (empty when it can)."""
    run_dir = args.resume
    if not os.path.isdir(run_dir):
        return [f"--resume {run_dir!r}: no such directory"]
    config = read_config(run_dir)
    if config is None:
        return [f"--resume {run_dir!r} is not a run directory of these scripts (no readable config.json)"]
    if config["algo"] != ALGO:
        return [f"--resume {run_dir!r} is a {config['algo'].upper()} run: resume it with {config['algo']}_atari_meanexp.py"]
    errors = []
    if not os.path.isfile(os.path.join(run_dir, CHECKPOINT)):
        errors.append(f"--resume {run_dir!r} has no {CHECKPOINT} (the run stopped before its first one): "
                      "remove or rename the directory, then start the run again")
    may_change = ", ".join(f"--{name.replace('_', '-')}" for name in RESUME_MAY_CHANGE)
    for name in (field.name for field in dataclasses.fields(Args)):
        if name in config and name not in (*RESUME_MAY_CHANGE, "resume") and getattr(args, name) != config[name]:
            errors.append(f"--{name.replace('_', '-')} {getattr(args, name)} differs from the run's {config[name]}: "
                          f"a resumed run keeps its settings (only {may_change} may change)")
    return errors


def available_memory_bytes() -> int:
    """Memory this process can still get: the machine's MemAvailable, or less where a cgroup
    (a container, a SLURM job) sets a lower limit."""
    def read_int(path):
        try:
            with open(path) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None  # no such file, or "max": no limit

    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit, usage in [("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")]:
        limit, usage = read_int(f"/sys/fs/cgroup/{limit}"), read_int(f"/sys/fs/cgroup/{usage}")
        if limit is not None and usage is not None:
            free = min(free, limit - usage)
    return free


class Run:
    """One run's directory, config.json, TensorBoard writer, progress line, checkpoints and signals."""

    @classmethod
    def start(cls, args: Args) -> Optional["Run"]:
        """Checks everything before anything is written; None where a resumed run is already finished."""
        errors = check_args(args) + (check_resume(args) if args.resume is not None else [])
        if errors:
            fail(errors)
        resumed = None  # the checkpoint we continue from: its tensors stay in the file (mmap) until copied into place
        if args.resume is not None:
            resumed = torch.load(os.path.join(args.resume, CHECKPOINT), map_location="cpu", weights_only=False, mmap=True)
            if resumed["global_step"] > args.total_timesteps:
                fail([f"--total-timesteps {args.total_timesteps} is below the {resumed['global_step']} steps done"])
            if resumed["global_step"] == args.total_timesteps and os.path.exists(os.path.join(args.resume, "final_eval.json")):
                print(f"{args.resume} is finished ({args.total_timesteps:,} steps and final_eval.json): nothing to do "
                      "(a larger --total-timesteps extends it)")
                return None
        return cls(args, resumed)

    def __init__(self, args: Args, resumed: Optional[dict]):
        self.args, self.resumed = args, resumed
        self.n_actions, self.me_coef = actions_and_coef(args)
        check_memory(args)
        if resumed is None:
            game = args.env_id.replace("/", "-")
            run_name = args.run_name or f"{game}__{args.exp_name}__k{self.me_coef:g}__{args.seed}__{int(time.time())}"
            self.dir = os.path.join("runs", run_name)
            if os.path.exists(self.dir):
                fail([f"run directory {self.dir} already exists; choose another --run-name (nothing was overwritten)"])
        else:
            self.dir, run_name = args.resume, args.run_name
        self.checkpoint_path = os.path.join(self.dir, CHECKPOINT)
        self.device = seed_and_device(args)

        # Ctrl-C (SIGINT), SIGTERM or SIGUSR1 (a batch system's warning): checkpoint at the next safe point, then exit;
        # a second one while the checkpoint is written is only recorded, so the write always completes
        self.stop_signals = []
        self.previous_handlers = {sig: signal.signal(sig, lambda signum, frame: self.stop_signals.append(signum))
                                  for sig in STOP_SIGNALS}  # from before the run directory exists
        self.training_done = False
        settings = effective_settings(args, run_name, self.n_actions, self.me_coef, self.device)
        if resumed is not None:  # the first command stays; each resume is recorded after it
            previous = read_config(self.dir)
            resume = {"step": resumed["global_step"], "time": time.time(), "command": settings["command"],
                      "device": str(self.device)}
            # me_coef_default too: the resumed Args hold the run's k as a number, but whether it was |A| by default stays
            settings.update(command=previous["command"], me_coef_default=previous["me_coef_default"],
                            resumes=previous.get("resumes", []) + [resume])
            if "wandb_run_id" in previous:  # a tracked run continues its wandb run
                settings["wandb_run_id"] = previous["wandb_run_id"]
        if args.track:  # before the run directory exists: a failed login leaves nothing behind
            settings["wandb_run_id"] = start_tracking(args, run_name, settings, self.dir)
        if resumed is None:
            os.makedirs(self.dir)
        write_json(os.path.join(self.dir, "config.json"), settings)
        # on resume, TensorBoard drops what a killed process logged after the checkpoint: no step twice, none missing
        self.writer = SummaryWriter(self.dir, purge_step=None if resumed is None else resumed["global_step"] + 1)
        if resumed is None:
            table = "\n".join(f"|{k}|{v}|" for k, v in settings.items())
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
        self.checkpoint_step = None if resumed is None else resumed["global_step"]  # of the last checkpoint written
        self.checkpoint_due = False

    def begin(self, state: LoopState, p: Parts) -> LoopState:
        """The state the loop starts from: a resumed run's, restored exactly; a new run's, checkpointed at once."""
        if self.resumed is not None:
            state = self.restore(state, p)
        else:
            self.checkpoint(state, p)  # a run killed before its first periodic checkpoint can still be resumed
        self.progress = Progress(self.args, state.global_step, time.time())
        return state

    def restore(self, state: LoopState, p: Parts) -> LoopState:
        """Continues exactly where the checkpoint left off."""
        saved, args = self.resumed, self.args
        copy_out = lambda t: t.to(self.device, copy=True)  # noqa: E731 (out of the file, which the next checkpoint replaces)
        # the saved fields over the fresh state (a field newer than the checkpoint keeps its fresh value)
        state = dataclasses.replace(state, **{f.name: saved[f.name] for f in dataclasses.fields(LoopState) if f.name in saved})
        state.sums, state.bad_step = copy_out(state.sums), copy_out(state.bad_step)
        state.update_origin = tuple(state.update_origin)
        if state.best_state is not None:
            state.best_state = {name: copy_out(value) for name, value in state.best_state.items()}
        p.q_network.load_state_dict(saved["q_network"])
        p.target_network.load_state_dict(saved["target_network"])
        p.optimizer.load_state_dict(saved["optimizer"])
        p.envs.set_attr("snapshot", list(saved["envs"]))
        p.eval_env.snapshot = saved["eval_env"]
        if state.starting.any():  # only a final checkpoint has envs due to autoreset: their next step() is that reset
            p.envs.set_attr("reset_on_next_step", state.starting.tolist())
        set_rng_states(saved["rng"], self.device)
        p.rng.bit_generator.state, p.eval_rng.bit_generator.state = saved["explore_rng"], saved["eval_rng"]
        if saved["replay"] is not None:
            p.rb.load_state_dict(saved["replay"])
        else:  # a checkpoint without the buffer: collect --learning-starts transitions again before learning
            p.rb.start_episodes(state.obs[:, -1])
            state.update_origin = (state.global_step + args.learning_starts, state.updates)
        print(f"resumed {self.dir} at step {state.global_step:,}")
        self.resumed = None  # closes the file's memory map
        return state

    def checkpoint(self, state: LoopState, p: Parts):
        """Writes everything the loop needs to go on exactly as if it had never stopped."""
        self.check_finite(state, p)
        self.writer.flush()  # the events up to this step are on disk before the checkpoint that follows them
        saved = {"algo": ALGO, **vars(state), "q_network": p.q_network.state_dict(),
                 "target_network": p.target_network.state_dict(), "optimizer": p.optimizer.state_dict(),
                 "envs": p.envs.get_attr("snapshot"), "eval_env": p.eval_env.snapshot, "rng": rng_states(self.device),
                 "explore_rng": p.rng.bit_generator.state, "eval_rng": p.eval_rng.bit_generator.state,
                 "replay": p.rb.state_dict() if self.args.checkpoint_buffer else None}
        atomic_save(self.checkpoint_path, lambda tmp: torch.save(saved, tmp))
        self.checkpoint_step = state.global_step

    def checkpoint_when_due(self, before: int, state: LoopState, p: Parts):
        """Every --checkpoint-interval steps, and on SIGTERM/SIGUSR1 (then exits for a requeue)."""
        self.checkpoint_due |= bool(crossed(before, state.global_step, self.args.checkpoint_interval))
        if (self.checkpoint_due or self.stop_signals) and not state.starting.any():  # an env due to autoreset cannot be saved
            self.checkpoint(state, p)
            self.checkpoint_due = False
            if self.stop_signals:
                self.exit_for_requeue(self.stop_signals[0])

    def check_finite(self, state: LoopState, p: Parts):
        """Stops the run, keeping the last good checkpoint, once a loss, a Q-value or a weight is not finite."""
        step = int(state.bad_step)  # a device sync: only at log points and checkpoints
        weights_ok = bool(torch.stack([w.isfinite().all() for w in p.q_network.parameters()]).all())
        if step >= 0 or not weights_ok:
            where = f"at step {step:,}" if step >= 0 else f"in the network's weights by step {state.global_step:,}"
            kept = f"its last good checkpoint, of step {self.checkpoint_step:,}, is kept in {self.checkpoint_path}"
            self.writer.close()
            fail([f"a loss or Q-value that is not finite appeared {where}; the run stops ({kept})"], EXIT_NON_FINITE)

    def exit_for_requeue(self, signum, frame=None):
        """After a checkpoint: says how to continue, then exits: 130 after Ctrl-C, else the code a batch system requeues on."""
        code = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_REQUEUE
        self.writer.close()
        stage = " (it holds the whole training: the resumed run plays the final evaluation)" if self.training_done else ""
        print(f"signal {signal.Signals(signum).name}: checkpoint at step {self.checkpoint_step:,} in {self.checkpoint_path}"
              f"{stage}; continue with --resume {self.dir} (exit code {code})", flush=True)
        sys.exit(code)

    def report_progress(self, state: LoopState):
        line = self.progress.line(state, time.time())
        if line is not None:
            print(line, flush=True)

    def end_training(self, state: LoopState, p: Parts):
        if state.global_step > self.progress.start_step:
            self.checkpoint(state, p)  # the end of training: a final evaluation cut short, or a longer run, resumes from here
        p.envs.close()
        self.training_done = True
        for sig in self.previous_handlers:  # the checkpoint holds the whole run: a signal stops the final evaluation now
            signal.signal(sig, self.exit_for_requeue)
        if self.stop_signals:  # one came on the last training step, while an env was due to autoreset
            self.exit_for_requeue(self.stop_signals[0])

    def finish(self, final: dict):
        """Writes final_eval.json (keeping an earlier result of an extended run) and closes the logs."""
        final_path = os.path.join(self.dir, "final_eval.json")
        if os.path.exists(final_path):  # a run extended with a larger --total-timesteps keeps its earlier result
            with open(final_path) as f:
                previous = json.load(f)
            os.replace(final_path, os.path.join(self.dir, f"final_eval_step{previous['total_steps']}.json"))
        write_json(final_path, final)
        self.writer.close()
        if self.args.track:  # the final evaluation goes into the wandb run's summary; then the upload (or offline write) ends
            import wandb

            wandb.run.summary.update({f"final_eval/{k}": v for k, v in final.items() if isinstance(v, (int, float))})
            wandb.finish()
        print(f"final evaluation: mean {final['mean']:.1f}, median {final['median']:.1f} over {final['episodes']} episodes "
              f"-> {final_path}")
        for sig, handler in self.previous_handlers.items():  # for callers that go on after main(), such as tests
            signal.signal(sig, handler)


class Progress:
    """The console progress line. Its rate and ETA are those of the last `window` lines: the whole run's average
    would count the fast collection before learning starts (an ETA of 31 h for a run that needed 4 days)."""

    def __init__(self, args: Args, step: int, now: float, window: int = 10):
        self.args, self.start_step, self.start_time, self.eval_time = args, step, now, 0.0
        self.marks = collections.deque([(now, step)], maxlen=window + 1)  # (time, step) of the recent lines

    def training_rate(self, step: int) -> float:
        """Agent steps per second since the start of this process, evaluations left out (TensorBoard's charts/SPS)."""
        return (step - self.start_step) / max(time.time() - self.start_time - self.eval_time, 1e-9)

    def line(self, state: LoopState, now: float) -> Optional[str]:
        """The progress line when one is due (every --progress-interval seconds, and at the end), else None."""
        total = self.args.total_timesteps
        if now - self.marks[-1][0] < self.args.progress_interval and state.global_step < total:
            return None
        self.marks.append((now, state.global_step))
        (then, step_then), elapsed = self.marks[0], now - self.start_time
        rate = (state.global_step - step_then) / max(now - then, 1e-9)
        eta = format_duration((total - state.global_step) / rate) if rate > 0 else "n/a"
        recent = f"{np.mean(state.recent_returns):.1f}" if state.recent_returns else "n/a"
        return (f"step {state.global_step:,}/{total:,} ({100 * state.global_step / total:.1f}%) | {rate:,.0f} SPS recently | "
                f"elapsed {format_duration(elapsed)} | ETA {eta} | {state.episodes:,} episodes, "
                f"return (last {len(state.recent_returns)}) {recent}")


def evaluate_saved_model(args: Args):
    """--eval-model: the saved network plays --final-eval-episodes games on the evaluation env (seeded 2^31 - 1 - seed,
    the run's evaluation epsilon), as the run's final evaluation; prints the statistics and writes them beside it."""
    path = args.eval_model
    out = f"{os.path.splitext(path)[0]}_eval_seed{args.seed}.json"
    errors = check_args(args) + ([] if args.resume is None else ["--eval-model and --resume exclude each other"])
    config = read_config(os.path.dirname(path) or ".")
    if not os.path.isfile(path):
        errors.append(f"--eval-model {path!r}: no such file (--save-model writes runs/RUN/EXP_NAME.cleanrl_model)")
    elif config is not None and config["algo"] != ALGO:
        errors.append(f"--eval-model {path!r} is a {config['algo'].upper()} model: "
                      f"evaluate it with {config['algo']}_atari_meanexp.py")
    if os.path.exists(out):
        errors.append(f"{out} exists (this model, this seed): move it away or choose another --seed (nothing was overwritten)")
    if errors:
        fail(errors)
    n_actions, me_coef = actions_and_coef(args)
    network = make_network(args, n_actions, me_coef)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    mine = network.state_dict()
    if not isinstance(saved, dict) or saved.keys() != mine.keys():
        fail([f"--eval-model {path!r} is not a network {ALGO}_atari_meanexp.py saves with these settings (another algorithm, "
              "or another --network?)"])
    wrong = [f"{k} {tuple(v.shape)} (here {tuple(mine[k].shape)})" for k, v in saved.items() if v.shape != mine[k].shape]
    if wrong:
        fail([f"--eval-model {path!r} does not fit {args.env_id} with {n_actions} actions (full action set: "
              f"{args.full_action_space}): {', '.join(wrong)}"])
    network.load_state_dict(saved)
    device = seed_and_device(args)
    env, eval_rng = make_eval_env(args, args.capture_video, os.path.dirname(path) or ".")
    result = evaluate(network.to(device), env, device, args.eval_epsilon, args.gamma, eval_rng,
                      max_episodes=args.final_eval_episodes)
    env.close()
    stats = final_statistics(result)
    write_json(out, {"algo": ALGO, "model": path, "env_id": args.env_id, "seed": args.seed, "epsilon": args.eval_epsilon,
                     **stats})
    print(f"evaluation of {path}: mean {stats['mean']:.1f}, median {stats['median']:.1f} over {stats['episodes']} episodes, "
          f"overestimation {stats['overestimation']} -> {out}")


def start_tracking(args: Args, run_name: str, settings: dict, run_dir: str) -> str:
    """--track: a Weights & Biases run that mirrors the TensorBoard logs (CleanRL's setup); a resumed run continues
    its wandb run. Returns the wandb run id, which config.json keeps."""
    import wandb  # only here: wandb is optional

    try:
        tracked = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, group=args.wandb_group,
                             name=run_name, id=settings.get("wandb_run_id"), resume="allow", config=settings,
                             sync_tensorboard=True, save_code=True)
    except Exception as e:  # no login, no network: say so now, not hours in
        fail([f"--track: wandb could not start ({type(e).__name__}: {e}); run `wandb login`, or set WANDB_MODE=offline "
              "and upload later with `wandb sync`"])
    if args.capture_video:  # uploads each video as it is written
        run_dir = os.path.abspath(run_dir)
        wandb.save(os.path.join(run_dir, "videos", "*.mp4"), base_path=run_dir, policy="live")
    return tracked.id


def actions_and_coef(args: Args) -> tuple:
    """|A| of the game (one env built and closed, before anything large is allocated) and the run's k."""
    probe = make_env(args, args.seed)()
    n_actions = int(probe.action_space.n)
    probe.close()
    return n_actions, default_me_coef(args, n_actions) if args.me_coef is None else float(args.me_coef)


def seed_and_device(args: Args) -> torch.device:
    """Seeds Python's, NumPy's and PyTorch's generators; the device: CUDA where there is one and --cuda."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")


def check_memory(args: Args):
    """Refuses a replay buffer that does not fit: numpy commits its pages only as they fill, so it would fail hours in."""
    replay_bytes, free_bytes = ReplayBuffer.bytes_needed(args.buffer_size, args.num_envs), available_memory_bytes()
    print(f"replay buffer: {args.buffer_size:,} transitions need {replay_bytes / 1e9:.2f} GB "
          f"({replay_bytes / args.buffer_size:,.0f} bytes each); {free_bytes / 1e9:.2f} GB available")
    if replay_bytes + HEADROOM_BYTES > free_bytes:
        fail([f"--buffer-size {args.buffer_size} needs {replay_bytes / 1e9:.2f} GB (plus {HEADROOM_BYTES / 1e9:.0f} GB for "
              f"the rest of the run) but only {free_bytes / 1e9:.2f} GB of memory is available; lower --buffer-size "
              f"(each transition takes about 7 kB)"])


class SnapshotEnv(gym.Wrapper):
    """The outermost wrapper: `env.snapshot` is the whole env's state as bytes, and assigning it restores
    that state, so a resumed run plays on exactly as if never stopped. (A property, so that a vector env
    reaches it in its worker processes with get_attr and set_attr.)"""

    reset_on_next_step = False  # set on resume where the env was due to autoreset when the checkpoint was written

    def step(self, action):
        if self.reset_on_next_step:  # what the vector env's autoreset would have done: the action is ignored
            self.reset_on_next_step = False
            obs, info = self.env.reset()
            return obs, 0.0, False, False, info
        return self.env.step(action)

    @property
    def snapshot(self) -> bytes:
        layers, env = [], self.env
        while env is not env.unwrapped:  # every wrapper's own state: frame stack, step counts, lives, returns, ...
            state = {name: value for name, value in vars(env).items() if name != "env" and not callable(value)}
            layers.append({} if isinstance(env, gym.wrappers.RecordVideo) else state)  # a clip being recorded is not resumed
            env = env.env
        game = env.clone_state(include_rng=True)  # the emulator, with its RNG
        return pickle.dumps((layers, game, env.np_random.bit_generator.state, env.action_space.np_random.bit_generator.state))

    @snapshot.setter
    def snapshot(self, data: bytes):
        layers, game, np_random, action_space_random = pickle.loads(data)
        env = self.env
        for layer in layers:
            vars(env).update(layer)
            env = env.env
        env.restore_state(game)
        env.np_random.bit_generator.state = np_random  # the no-op starts draw from it
        env.action_space.np_random.bit_generator.state = action_space_random


def leave_signals_to_main_process(thunk):
    """Wraps an env thunk for a worker process: SIGINT, SIGTERM and SIGUSR1 are for the main process,
    which checkpoints and then closes its workers."""
    main_pid = os.getpid()

    def worker_thunk():
        if os.getpid() != main_pid:  # AsyncVectorEnv also calls a thunk in the main process, to read the spaces
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_IGN)
        return thunk()

    return worker_thunk


def effective_settings(args: Args, run_name: str, n_actions: int, me_coef: float, device: torch.device) -> dict:
    """Every setting the run used, including those derived from the env and the machine."""
    settings = {**dataclasses.asdict(args), **FIXED_SETTINGS}  # loss, optimizer, network; learning rate and eps as used
    settings.update(
        algo=ALGO,
        run_name=run_name,
        me_coef=me_coef,
        me_coef_default=args.me_coef is None,
        n_actions=n_actions,
        life_loss="ends the training episode" if args.episodic_life else "does not end the episode",
        replay_bytes=ReplayBuffer.bytes_needed(args.buffer_size, args.num_envs),
        device=str(device),
        versions={"torch": torch.__version__, "gymnasium": gym.__version__, "ale_py": ale_py.__version__,
                  "numpy": np.__version__},
        command=" ".join(sys.argv),
    )
    return settings


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def atomic_save(path: str, save):
    """save(tmp) writes a temporary file, which is flushed to disk and then renamed over path: a process
    killed at any moment leaves path holding either its previous content or the new one, never a torn file."""
    tmp = path + ".tmp"
    save(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, data: dict):
    def save(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)

    atomic_save(path, save)


def rng_states(device: torch.device) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}


def set_rng_states(states: dict, device: torch.device):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states["cuda"] is not None:
        torch.cuda.set_rng_state_all(states["cuda"])


HEADROOM_BYTES = 10**9  # PyTorch, the networks, the envs: what a run needs besides its replay buffer
EXIT_BAD_INPUT = 2  # a bad command line: nothing was written
EXIT_NON_FINITE = 3  # the run diverged (a loss or Q-value not finite): the last good checkpoint is kept; do not requeue
EXIT_REQUEUE = 75  # stopped by SIGTERM or SIGUSR1 after writing a checkpoint: run again with --resume (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C after writing a checkpoint: run again with --resume (the shell's code for SIGINT)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # each checkpoints the run and exits


def fail(errors: list, code: int = EXIT_BAD_INPUT):
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main(parse_args())
