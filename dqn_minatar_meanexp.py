"""DQN with a mean-expansion head on MinAtar: one file, read top to bottom.

    python dqn_minatar_meanexp.py --env-id MinAtar/Breakout-v1              # mean-expansion, k = |A| = 6
    python dqn_minatar_meanexp.py --env-id MinAtar/Breakout-v1 --me-coef 0  # plain DQN

MinAtar (Young & Tian 2019) is miniature Atari: five games (Asterix, Breakout, Freeway, Seaquest, SpaceInvaders) on a
10x10 grid, one binary channel per kind of object. The mean-expansion layer ("Accelerating Q-learning through Efficient
Value-Sharing across Actions", Nagarajan et al., ICML 2026) turns the network's raw output u into Q(s, a) = u(s, a) + k *
mean_b u(s, b). It is the function `mean_expansion` below and the last line of `QNetwork.forward`. The network is
MinAtar's (a 3x3 convolution of 16 channels, then 128 units) with PFRL's initialization, as the paper's; the protocol is
the DQN of "Revisiting Rainbow" (Obando-Ceron & Castro, ICML 2021) on MinAtar, with the paper's loss (docs/minatar.md).
The full set of 6 actions is played by default, as the authors' Atari agents play all 18, so that the default k = |A| = 6
is the authors' choice of k; --me-coef 1 is their "safe" value.

How to read this script, top to bottom: Args (defaults: the protocol); the mean-expansion head and the network; the
environment; the replay buffer; the loss and the update; evaluation; the training loop: the flags' checks, `main` (|A|, k,
device, the run, seeds, buffer, networks, envs), `train` (act, step, store, learn, sync, log, evaluate, checkpoint) and
`save_checkpoint` (what a checkpoint holds). The vector envs, the replay buffer (but for its stack of one frame), the
update, evaluation and the loop are dqn_atari_meanexp.py's, word for word; `main` differs in the frame's shape and the
minimal-action-set warning (tests/test_shared_code.py): `diff` the two to see what MinAtar changes. The long-run
machinery (run directory, checkpoint files, signals, memory, disk, progress, --track) is longrun.py beside it: a library
it calls, which a first reading can skip.
"""

import atexit
import copy
import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import random
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

import longrun  # the long-run machinery: checkpoints, resume, signals, the run directory

MINATAR_INSTALLED = importlib.util.find_spec("minatar") is not None  # else check_args says how to install it
if MINATAR_INSTALLED:
    import minatar
    import minatar.gym

    if "MinAtar/Breakout-v1" not in gym.registry:
        minatar.gym.register_envs()  # makes the MinAtar/<Game>-v0 and -v1 ids known to gymnasium
GAMES = ("Asterix", "Breakout", "Freeway", "Seaquest", "SpaceInvaders")

ALGO = "dqn"


@dataclass
class Args:
    exp_name: str = "dqn_minatar_meanexp"
    """the name of this experiment (part of the run name)"""
    run_name: Optional[str] = None
    """the run directory under runs/; default {env}__{exp_name}__k{k}__{seed}__{unix time}"""
    seed: int = 1
    """seed of the experiment (training envs use seed..seed+N-1, the evaluation env 2^31 - 1 - seed)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    compile: bool = False
    """if toggled, compile the whole loss and acting with torch.compile (numerics differ from eager mode at the
    float-rounding level)"""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile's mode with --compile; reduce-overhead also captures CUDA graphs (one launch per graph on a GPU)"""
    tf32: bool = False
    """if toggled, CUDA matmuls and convolutions may round their inputs to TF32; off: float32 throughout, as on the CPU"""
    capture_video: bool = False
    """whether to capture videos of the agent's games (first training env) into runs/{run_name}/videos"""
    save_model: bool = False
    """whether to save the final network, and the best by periodic evaluation (none with --eval-interval 0), to
    runs/{run_name}/"""
    track: bool = False
    """if toggled, track the run with Weights & Biases (pip install wandb); WANDB_MODE=offline writes it locally"""
    wandb_project_name: str = "meanexp-minatar"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team or user; default: your own)"""
    wandb_group: Optional[str] = None
    """the wandb group the run joins"""

    # Environment: MinAtar's own defaults
    env_id: str = "MinAtar/Breakout-v1"
    """the MinAtar game: MinAtar/<Game>-v1 with Game one of Asterix, Breakout, Freeway, Seaquest, SpaceInvaders"""
    sticky_action_prob: float = 0.1
    """probability that the game repeats the previous action each step (sticky actions; MinAtar's default)"""
    full_action_space: bool = True
    """play all 6 actions, whatever the id's version says (False: the game's minimal action set, 3 to 6 actions, and
    k's default |A| with it)"""
    difficulty_ramping: bool = True
    """whether the games speed up as they go (MinAtar's default)"""
    max_episode_steps: int = 100_000
    """an episode is truncated after this many agent steps (the games end by themselves long before, except a
    Breakout agent that never misses)"""

    # Algorithm: Revisiting Rainbow's DQN on MinAtar (docs/minatar.md), with the paper's loss
    me_coef: Optional[float] = None
    """the mean-expansion coefficient k; default |A| (6 with the full action set, the authors' choice); 1 is their
    "safe" value; 0 is plain DQN"""
    loss: Literal["sse", "mse", "huber"] = "sse"
    """TD loss on the batch: sse (sum of delta^2 / 2, the paper's), mse (mean of delta^2 / 2), huber (sum of Huber(delta))"""
    total_timesteps: int = 10_000_000
    """total agent steps (summed over all envs): Revisiting Rainbow's 10 iterations of 1M"""
    learning_rate: float = 2.5e-4
    """Adam's learning rate (Revisiting Rainbow's)"""
    optimizer_eps: float = 3.125e-4
    """Adam's epsilon (Revisiting Rainbow's)"""
    num_envs: int = 1
    """the number of parallel game environments"""
    buffer_size: int = 100_000
    """the replay memory size in transitions (frames stored once each)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    target_network_frequency: int = 1_000
    """agent steps between hard copies of the online network into the target network"""
    batch_size: int = 32
    """the batch size of sample from the replay memory"""
    start_e: float = 1.0
    """the starting epsilon for exploration"""
    end_e: float = 0.01
    """the ending epsilon for exploration"""
    exploration_steps: int = 250_000
    """agent steps over which epsilon decays linearly from start-e to end-e"""
    learning_starts: int = 1_000
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

    # Checkpoints: a long run survives preemption and time limits (docs/long-runs.md)
    checkpoint_interval: int = 1_000_000
    """agent steps between checkpoints to runs/{run_name}/checkpoint.pt (0: only at the start, the end and on a signal)"""
    checkpoint_buffer: bool = True
    """whether checkpoints hold the replay buffer (at most 100 MB); without it a resumed run refills it before learning"""
    keep_checkpoints: int = 1
    """checkpoints kept: the newest as checkpoint.pt, the others as checkpoint_step{N}.pt; --resume falls back to the
    newest readable one, so a damaged file costs only the steps since the one before it"""
    resume: Optional[str] = None
    """a run directory to continue from its checkpoint, with the run's own settings (only a few flags may change)"""
    eval_model: Optional[str] = None
    """instead of training: a .cleanrl_model saved by --save-model plays --final-eval-episodes games with its run's
    settings (config.json beside it; flags given override them) and writes the final evaluation's statistics"""


# ===========================================================================
# The mean-expansion head and the networks (online and target)
# ===========================================================================


def mean_expansion(values: torch.Tensor, coef: float) -> torch.Tensor:
    """Q = u + k * mean_b u(b) over the last (action) dimension. k = 0 is the identity."""
    return values + coef * values.mean(dim=-1, keepdim=True)


def pfrl_init(layer: nn.Module, bias: float) -> nn.Module:
    """PFRL's initialization, which the authors' DQN networks use: LeCun-normal weights (std 1/sqrt(fan_in)), constant bias."""
    nn.init.normal_(layer.weight, std=layer.weight[0].numel() ** -0.5)  # weight[0]: the inputs of one output unit
    nn.init.constant_(layer.bias, bias)
    return layer


class QNetwork(nn.Module):
    """MinAtar's network: Conv(C -> 16, 3x3) -> Linear(1024, 128) -> Linear(128, |A|) raw values u -> mean-expansion -> Q."""

    def __init__(self, n_actions: int, me_coef: float, channels: int):
        super().__init__()
        self.me_coef = me_coef
        self.network = nn.Sequential(pfrl_init(nn.Conv2d(channels, 16, 3, stride=1), bias=0.0), nn.ReLU(), nn.Flatten(),
                                     pfrl_init(nn.Linear(16 * 8 * 8, 128), bias=0.0), nn.ReLU(),
                                     pfrl_init(nn.Linear(128, n_actions), bias=0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.network(x.flatten(1, 2).float())  # x: 0/1 uint8 frames (batch, 1, C, 10, 10): a stack of one
        return mean_expansion(u, self.me_coef)

    def q_values(self, x: torch.Tensor) -> torch.Tensor:
        """Q(s, .) for act() and evaluate(); via __call__, so --compile applies."""
        return self(x)


def make_network(args: Args, n_actions: int, me_coef: float) -> nn.Module:
    """Builds the network the run trains, for the game's number of channels."""
    return QNetwork(n_actions, me_coef, channels=game_frame(args.env_id)[0])


def default_me_coef(args: Args, n_actions: int) -> float:
    """k when --me-coef is not given: |A|, the authors' choice (6 with the full action set)."""
    return float(n_actions)


# ===========================================================================
# Environment: MinAtar's gymnasium envs, each observation one frame of C binary channels
# ===========================================================================


def make_env(args: Args, seed: int, capture_video: bool = False, run_dir: str = "", evaluation: bool = False):
    """Returns a thunk building one env whose observations are uint8 (1, C, 10, 10): one frame, channels first, as a
    stack of one, so that the replay buffer, acting and evaluation below are the Atari script's."""

    def thunk():
        env = gym.make(args.env_id, use_minimal_action_set=not args.full_action_space,
                       sticky_action_prob=args.sticky_action_prob, difficulty_ramping=args.difficulty_ramping,
                       render_mode="rgb_array" if capture_video else None,
                       max_episode_steps=args.max_episode_steps)  # truncation, not termination
        if capture_video:
            env = gym.wrappers.RecordVideo(env, os.path.join(run_dir, "videos"))
        env = gym.wrappers.RecordEpisodeStatistics(env)  # whole-game score and length, in info["episode"]
        height, width, channels = env.observation_space.shape
        frame = gym.spaces.Box(0, 1, (1, channels, height, width), np.uint8)
        env = gym.wrappers.TransformObservation(env, one_frame, frame)
        env = longrun.SnapshotEnv(env)
        env.action_space.seed(seed)  # the game itself is seeded by the first reset(seed=...)
        return env

    return thunk


def one_frame(obs: np.ndarray) -> np.ndarray:
    """MinAtar's bool (10, 10, C) observation as uint8 (1, C, 10, 10). A named function: a checkpoint pickles the wrapper."""
    return obs.transpose(2, 0, 1)[None].astype(np.uint8)


@functools.cache  # the network, the buffer and config.json each need it: the game is built once
def game_frame(env_id: str) -> tuple:
    """The shape of one stored frame, (C, 10, 10), of a MinAtar game (C: its kinds of object)."""
    height, width, channels = minatar.Environment(gym.spec(env_id).kwargs["game"]).state_shape()
    return channels, height, width


def make_train_envs(args: Args, run_dir: str):
    """N training envs stepped together. Autoreset is NEXT_STEP: the step after an episode ends
    returns the new episode's first observation (its action is ignored) instead of a transition."""
    thunks = [make_env(args, args.seed + i, args.capture_video and i == 0, run_dir) for i in range(args.num_envs)]
    if args.num_envs == 1:
        return gym.vector.SyncVectorEnv(thunks, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    thunks = [longrun.leave_signals_to_main_process(thunk) for thunk in thunks]
    return gym.vector.AsyncVectorEnv(thunks, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


def make_eval_env(args: Args, capture_video: bool = False, video_dir: str = ""):
    """The evaluation env and the generator of its epsilon draws, both seeded 2^31 - 1 - seed (the authors' seed)."""
    seed = 2**31 - 1 - args.seed
    env = make_env(args, seed, capture_video, video_dir, evaluation=True)()
    env.reset(seed=seed)  # seeds the eval games once; later resets continue its RNG
    return env, np.random.default_rng(seed)


def game_actions(args: Args) -> int:
    """The game's number of actions |A|: one env, built and closed (before anything large is allocated)."""
    probe = make_env(args, args.seed)()
    n_actions = int(probe.action_space.n)
    probe.close()
    return n_actions


# ===========================================================================
# Replay buffer: each (C, 10, 10) frame stored once; the Atari script's, stacks of one frame
# ===========================================================================


class Batch(NamedTuple):
    obs: torch.Tensor  # uint8 (B, 1, C, 10, 10)
    actions: torch.Tensor  # int64 (B,)
    rewards: torch.Tensor  # float32 (B,), raw game reward
    next_obs: torch.Tensor  # uint8 (B, 1, C, 10, 10)
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

    STACK = 1  # MinAtar: an observation is one frame (all its channels); the Atari script stacks 4
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
        # np.full writes every page now: the run holds its memory from the start (and the memory check of a run started
        # after it sees that), not only once the ring fills, hours in
        self.frames = np.full((num_envs, self.slots, *frame_shape), 0, dtype=np.uint8)
        for name, dtype in self.FIELDS.items():
            setattr(self, name, np.full((num_envs, self.slots), 0, dtype=dtype))
        self.cursor = 0  # every env writes one frame per add(), so all rings share one write position
        self.filled = 0
        self.rng = np.random.default_rng(seed)
        self._env_index = np.arange(num_envs)
        self._stack_back = np.arange(self.STACK - 1, -1, -1)  # how far back each stack position looks: 3, 2, 1, 0
        self._pinned = []  # CUDA: pinned host memory that batches are copied from, in turn (_host_batch)

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

    def draw(self, n: int, rng: np.random.Generator) -> tuple:
        """(env, slot) of n transitions drawn uniformly, with replacement, among the valid ones, from rng."""
        if not self.valid.any():
            raise RuntimeError("the replay buffer holds no complete transition yet")
        env = rng.integers(self.num_envs, size=n)
        slot = rng.integers(self.filled, size=n)
        bad = ~self.valid[env, slot]
        while bad.any():  # rejection sampling keeps the draw uniform over valid transitions
            env[bad] = rng.integers(self.num_envs, size=bad.sum())
            slot[bad] = rng.integers(self.filled, size=bad.sum())
            bad = ~self.valid[env, slot]
        return env, slot

    def sample_states(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        """The observations (4-frame stacks) of n transitions drawn from rng: the states the action-gap statistic
        measures. A plain copy, not the pinned pairs of sample(): it runs once per target sync."""
        env, slot = self.draw(n, rng)
        back = np.minimum(self._stack_back[None, :], self.history[env, slot][:, None])
        rows = env[:, None] * self.slots + (slot[:, None] - back) % self.slots
        return torch.from_numpy(self.frames.reshape(-1, *self.frames.shape[2:])[rows]).to(self.device)

    def sample(self, batch_size: int) -> Batch:
        env, slot = self.draw(batch_size, self.rng)
        # 5 frames a transition: its stack, then its next frame (the next stack is the stack moved on by one frame)
        back = np.minimum(self._stack_back[None, :], self.history[env, slot][:, None])  # (B, 4): the episode's start repeats
        rows = env[:, None] * self.slots + np.concatenate([slot[:, None] - back, slot[:, None] + 1], axis=1) % self.slots
        frames, scalars, copied = self._host_batch(batch_size)
        np.take(self.frames.reshape(-1, *self.frames.shape[2:]), rows, axis=0, out=frames.numpy(), mode="clip")
        scalars.numpy()[:] = np.stack([a[env, slot] for a in (self.actions, self.rewards, self.terminated, self.truncated)], 1)
        frames, scalars = frames.to(self.device, non_blocking=True), scalars.to(self.device, non_blocking=True)
        if copied is not None:
            copied.record()
        return Batch(obs=frames[:, :-1], actions=scalars[:, 0].long(), rewards=scalars[:, 1], next_obs=frames[:, 1:],
                     terminated=scalars[:, 2], truncated=scalars[:, 3])

    def _host_batch(self, batch_size: int) -> tuple:
        """Host tensors to gather a batch into (frames; actions, rewards, terminated, truncated), and an event to record
        once they are copied. On CUDA: two pinned pairs in turn, so a copy never waits for the GPU, and filling a pair
        waits only for its own previous copy. On the CPU: new tensors, which the batch then is."""
        shapes = [((batch_size, self.STACK + 1, *self.frames.shape[2:]), torch.uint8), ((batch_size, 4), torch.float32)]
        if self.device.type != "cuda":
            return *(torch.empty(shape, dtype=dtype) for shape, dtype in shapes), None
        if not self._pinned or len(self._pinned[0][1]) != batch_size:
            pair = lambda: [*(torch.empty(s, dtype=d, pin_memory=True) for s, d in shapes), torch.cuda.Event()]  # noqa: E731
            self._pinned = [pair(), pair()]
        self._pinned.reverse()
        if not self._pinned[0][2].query():  # this pair's previous batch has not reached the GPU yet: wait for it
            self._pinned[0][2].synchronize()
        return self._pinned[0]


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
    """--loss of Q(s, a) against r + gamma * max_a' Q_target(s', a').

    Rewards are clipped to their sign (MinAtar's are 0 or 1: unchanged), as the Atari script's; a truncated episode
    bootstraps, a terminated one does not. Returns (loss, Q(s, .) of the online network).
    """
    with torch.no_grad():
        next_q = target_network(batch.next_obs).max(dim=1).values
        target = torch.sign(batch.rewards) + args.gamma * (1.0 - batch.terminated) * next_q
    q = q_network(batch.obs)
    q_taken = q.gather(1, batch.actions[:, None]).squeeze(1)
    return td_error_loss(q_taken, target, args.loss), q


LOSS = td_loss  # what update() minimizes (main compiles it with --compile)


def update(q_network, target_network, optimizer, batch: Batch, args: Args, loss_fn=LOSS):
    """One gradient step. Returns (loss, mean Q of the taken actions, action gap, the Q values the authors' average_q
    records: those of the taken actions, as PFRL's DQN), all still on the device."""
    loss, q = loss_fn(q_network, target_network, batch, args)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    q = q.detach()
    q_taken = q.gather(1, batch.actions[:, None]).squeeze(1)
    return loss.detach(), q_taken.mean(), action_gap(q), q_taken




def make_optimizer(args: Args, network: nn.Module) -> torch.optim.Optimizer:
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
    """The authors' statistics of one evaluation episode (their `me_layer` evaluation; docs/analysis.md): q[t] =
    Q(s_t, a_t) of the greedy action, rewards sign-clipped, bootstrap = Q(s_T, greedy action) where the episode was cut,
    0 where it ended."""
    q, returns = np.asarray(q, dtype=np.float64), discounted_returns(rewards, gamma, bootstrap)
    error = q - returns
    return {"overestimation": error.mean(), "normalized_overestimation": error.mean() / abs(q.mean()), "mean_q": q.mean(),
            "mean_return": returns.mean(),  # the bootstrapped G_t the overestimation is measured against, mean over steps
            "mean_discounted_return": discounted_returns(rewards, gamma)[0]}  # G_0 without the bootstrap


Q_RECORD = 1000  # the authors' average_q: the mean of the last 1,000 Q values of training batches


@torch.no_grad()
def measure_action_gap(network: nn.Module, rb: ReplayBuffer, n_states: int, rng: np.random.Generator) -> float:
    """The authors' action gap, measured at every target sync: the mean over n_states replay states of (largest Q -
    second largest Q), network in eval mode. Its states, and IQN's taus, come from rng: no training draw moves."""
    obs = rb.sample_states(n_states, rng)
    with torch.random.fork_rng():  # torch's generators (CPU, CUDA) are put back as they were afterwards
        torch.manual_seed(int(rng.integers(2**63)))
        network.eval()
        gap = action_gap(network.q_values(obs))
        network.train()
    return gap.item()


def record_q(state, values: torch.Tensor):
    """Writes a training batch's Q values into the ring of the last Q_RECORD (on the device: no sync)."""
    values = values[-Q_RECORD:].to(state.q_record.dtype)
    start = state.q_recorded % Q_RECORD
    head = min(len(values), Q_RECORD - start)  # the slots up to the ring's end; the rest wrap around to its start
    state.q_record[start:start + head] = values[:head]  # slices, not an index tensor: two copies at most, no arange
    if head < len(values):
        state.q_record[:len(values) - head] = values[head:]
    state.q_recorded += len(values)


def claim_statistics(state) -> dict:
    """What the authors' agent writes into every evaluation row (docs/analysis.md): average_q (the last Q_RECORD
    training-batch Q values), average_action_gap (the syncs' gaps since the last evaluation, then emptied) and
    relative_action_gap = gap / (|average_q| + 1e-8). None where nothing was measured yet."""
    n = min(state.q_recorded, Q_RECORD)
    average_q = state.q_record[:n].double().mean().item() if n else None
    gap = float(np.mean(state.gap_record)) if state.gap_record else None
    state.gap_record = []
    relative = gap / (abs(average_q) + 1e-8) if gap is not None and average_q is not None else None
    return {"average_q": average_q, "average_action_gap": gap, "relative_action_gap": relative}


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
            "median": float(np.median(scores)), "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
            **{key: result[key] for key in EVAL_LOGGED}}


def evaluate_saved_model(args: Args):
    """--eval-model: the saved network plays --final-eval-episodes games on the evaluation env (seeded 2^31 - 1 - seed,
    the run's evaluation epsilon), as the run's final evaluation; prints the statistics and writes them beside it."""
    path = args.eval_model
    out = f"{os.path.splitext(path)[0]}_eval_seed{args.seed}.json"
    longrun.check_eval_model(args, ALGO, out, check_args(args))  # every problem named at once (exit 2)
    n_actions = game_actions(args)
    network = make_network(args, n_actions, default_me_coef(args, n_actions) if args.me_coef is None else args.me_coef)
    longrun.load_network(network, path, ALGO, f"{args.env_id} with {n_actions} actions (full action set: "
                         f"{args.full_action_space})")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    env, eval_rng = make_eval_env(args, args.capture_video, os.path.dirname(path) or ".")
    longrun.forget_seeding_clip(env)
    result = evaluate(network.to(device), env, device, args.eval_epsilon, args.gamma, eval_rng,
                      max_episodes=args.final_eval_episodes)
    env.close()
    stats = final_statistics(result)
    longrun.write_result(out, {"algo": ALGO, "model": path, "env_id": args.env_id, "seed": args.seed,
                               "epsilon": args.eval_epsilon, **stats})
    over = "n/a (no episode finished)" if stats["overestimation"] is None else f"{stats['overestimation']:.3f}"
    print(f"evaluation of {path}: mean {stats['mean']:.1f}, median {stats['median']:.1f} over {stats['episodes']} "
          f"episodes, overestimation {over} -> {out}")


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

    obs: np.ndarray  # the envs' current observations (num_envs, *one observation's shape)
    resetting: np.ndarray  # envs whose next step() is an autoreset, not a transition
    sums: torch.Tensor  # loss, Q, action gap summed on the device between log points
    bad_step: torch.Tensor  # the first step whose loss or Q was not finite (-1: none), read at log points
    # (step, updates by then): no update until that step (--learning-starts, or the refill of a resume without the
    # buffer), then one per --train-frequency agent steps
    updates_from: tuple
    global_step: int = 0
    updates: int = 0
    logged_updates: int = 0  # the updates up to the last log point
    episodes: int = 0
    evaluations: int = 0
    recent_returns: list = dataclasses.field(default_factory=list)  # the last 20 training scores, for the progress line
    best_score: float = -float("inf")  # the best periodic evaluation: the final evaluation plays its network
    best_state: Optional[dict] = None
    best_step: Optional[int] = None
    # the authors' statistics (claim_statistics): a ring of the last Q_RECORD training-batch Q values, how many were
    # written, the action gaps measured at the syncs since the last evaluation, and the generator their states come from
    q_record: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(Q_RECORD))
    q_recorded: int = 0
    gap_record: list = dataclasses.field(default_factory=list)
    gap_rng: np.random.Generator = dataclasses.field(default_factory=np.random.default_rng)


@dataclass
class TrainingSetup:
    """What main builds for the loop, besides its state (a checkpoint holds their state too)."""

    device: torch.device
    n_actions: int  # |A|
    me_coef: float  # k
    q_network: nn.Module
    target_network: nn.Module
    optimizer: torch.optim.Optimizer
    rb: ReplayBuffer
    envs: gym.vector.VectorEnv
    eval_env: gym.Env
    rng: np.random.Generator  # exploration draws
    eval_rng: np.random.Generator  # the evaluation's epsilon draws
    loss_fn: Callable  # the loss update() computes: compiled with --compile


RESUME_MAY_CHANGE = ("cuda", "save_model", "compile", "compile_mode")  # besides the long-run flags (longrun.RESUME_MAY_CHANGE)


def parse_args(argv=None) -> Args:
    """The command line. With --resume RUN_DIR (or --eval-model), the flags not given take the run's saved settings."""
    return longrun.parse_args(Args, argv)


def check_args(args: Args) -> list:
    """One message per bad flag of the experiment (empty when all are fine); longrun.py checks its own flags."""
    errors = longrun.range_errors(
        args, positive=["num_envs", "buffer_size", "batch_size", "target_network_frequency", "train_frequency",
                        "max_episode_steps", "eval_steps", "final_eval_episodes", "log_interval", "learning_rate",
                        "optimizer_eps"],
        non_negative=["eval_interval", "exploration_steps", "learning_starts"],
        probabilities=["start_e", "end_e", "eval_epsilon"])
    ids = [f"MinAtar/{game}-v1" for game in GAMES]
    if not MINATAR_INSTALLED:
        errors.append("MinAtar is not installed: python -m pip install -r requirements.txt (it pins minatar)")
    elif args.env_id not in ids and args.env_id.replace("-v0", "-v1") not in ids:
        errors.append(f"--env-id {args.env_id!r} is not a MinAtar game; use one of {', '.join(ids)}")
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
    if args.compile_mode != "default" and not args.compile:
        errors.append(f"--compile-mode {args.compile_mode} applies with --compile only")
    if args.capture_video and importlib.util.find_spec("moviepy") is None:
        errors.append("--capture-video needs moviepy: pip install moviepy")
    return errors + algo_errors(args)


def algo_errors(args: Args) -> list:
    """The checks of this algorithm's own flags (check_args does the rest): DQN on MinAtar has none of its own."""
    return []


def main(args: Args):
    """Trains, evaluates and writes the run. Takes the Args of parse_args(): with --resume, its settings are the run's."""
    # TF32 from --tf32 in matmuls and convolutions alike (PyTorch's own default: in cuDNN's convolutions only)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    if args.eval_model is not None:
        return evaluate_saved_model(args)  # no training: --eval-model
    longrun.check_command_line(args, ALGO, check_args(args), RESUME_MAY_CHANGE)  # every bad flag at once (exit 2)
    n_actions = game_actions(args)
    me_coef = default_me_coef(args, n_actions) if args.me_coef is None else float(args.me_coef)  # k
    if args.me_coef is None and n_actions != 6:  # a minimal action set smaller than the full one (Seaquest's is all 6)
        warnings.warn(f"--no-full-action-space: k defaults to this game's |A| = {n_actions}, not to the full set's 6, "
                      "the authors' k = |A|; give --me-coef to choose", stacklevel=2)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    game = args.env_id.replace("/", "-")
    run_name = args.run_name or f"{game}__{args.exp_name}__k{me_coef:g}__{args.seed}__{int(time.time())}"
    # a checkpoint (save_checkpoint) holds the online and target networks, the optimizer's two running averages and the
    # best network so far, the envs and the generators; and the replay buffer with --checkpoint-buffer
    weights = sum(t.numel() * t.element_size() for t in make_network(args, n_actions, me_coef).state_dict().values())
    replay_bytes = ReplayBuffer.bytes_needed(args.buffer_size, args.num_envs, game_frame(args.env_id))
    run = longrun.start_run(args, ALGO, run_name, run_settings(args, run_name, n_actions, me_coef, device), replay_bytes,
                            checkpoint_bytes=5 * weights + longrun.CHECKPOINT_EXTRA_BYTES)  # memory, disk, run directory
    if run is None:
        return  # a finished run: nothing to do
    random.seed(args.seed)  # seeding, as CleanRL: Python's, NumPy's and PyTorch's generators
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # the network's initial weights
    torch.backends.cudnn.deterministic = args.torch_deterministic
    rb = ReplayBuffer(args.buffer_size, args.num_envs, device, seed=args.seed,
                      frame_shape=game_frame(args.env_id))  # its pages are written now
    run.memory_taken()  # so the memory check of a run starting next on this machine counts them
    q_network = make_network(args, n_actions, me_coef).to(device)
    target_network = copy.deepcopy(q_network)
    loss_fn = LOSS
    if args.compile:  # static graphs, one per batch shape: the whole loss (both networks' paths in it), and acting
        loss_fn = torch.compile(LOSS, dynamic=False, mode=args.compile_mode)
        q_network.q_values = torch.compile(q_network.q_values, dynamic=False, mode=args.compile_mode)
    envs = make_train_envs(args, run.dir)
    atexit.register(envs.close)  # however the run ends: the workers ignore SIGTERM, so only this stops them
    eval_env, eval_rng = make_eval_env(args)
    setup = TrainingSetup(device, n_actions, me_coef, q_network, target_network, make_optimizer(args, q_network), rb, envs,
                          eval_env, rng=np.random.default_rng(args.seed), eval_rng=eval_rng, loss_fn=loss_fn)
    obs, _ = envs.reset(seed=args.seed)
    state = LoopState(obs, resetting=np.zeros(args.num_envs, dtype=bool), sums=torch.zeros(3, device=device),
                      bad_step=torch.tensor(-1, device=device), updates_from=(args.learning_starts, 0),
                      q_record=torch.zeros(Q_RECORD, device=device), gap_rng=np.random.default_rng([args.seed, 1]))
    if run.resumed is None:
        rb.start_episodes(obs[:, -1])
        save_checkpoint(args, run, setup, state)  # a run killed before its first periodic checkpoint can still be resumed
    else:
        state = restore_checkpoint(args, run, setup, state)
    run.begin(state.global_step)  # a resume is recorded in config.json; the progress line counts from here
    print(f"{ALGO} k={me_coef:g} on {args.env_id} ({n_actions} actions), {args.num_envs} env(s), "
          f"device {device}, logs in {run.dir}")
    train(args, run, setup, state)
    final_evaluation(args, run, setup, state)


FIXED_SETTINGS = {}  # what config.json records of the algorithm besides the flags (DQN: all are flags)


def run_settings(args: Args, run_name: str, n_actions: int, me_coef: float, device: torch.device) -> dict:
    """What config.json records: every setting the run used, those derived from the game and the machine included."""
    # a resumed run's Args hold its k as a number: whether k was |A| by default is the run's first record
    k_default = args.me_coef is None if args.resume is None else longrun.read_config(args.resume)["me_coef_default"]
    return {**dataclasses.asdict(args), **FIXED_SETTINGS, "algo": ALGO, "run_name": run_name, "me_coef": me_coef,
            "me_coef_default": k_default, "n_actions": n_actions, "frame_shape": list(game_frame(args.env_id)),
            "replay_bytes": ReplayBuffer.bytes_needed(args.buffer_size, args.num_envs, game_frame(args.env_id)),
            "device": str(device), "versions": {"torch": torch.__version__, "gymnasium": gym.__version__,
                                                "minatar": importlib.metadata.version("minatar"), "numpy": np.__version__}}


def train(args: Args, run: longrun.Run, setup: TrainingSetup, state: LoopState):
    """Act, step, store, learn, sync the target, log, evaluate, until --total-timesteps (checkpointing on the way)."""
    while state.global_step < args.total_timesteps:
        epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_steps, state.global_step)
        actions = act(setup.q_network, state.obs, epsilon, setup.rng, setup.n_actions, setup.device)
        next_obs, rewards, terminated, truncated, infos = setup.envs.step(actions)
        # state.resetting is still the previous step's: where it is set, this step was an autoreset (no transition)
        setup.rb.add(next_obs[:, -1], state.resetting, actions, rewards, terminated, truncated)
        before = state.global_step
        state.global_step += int((~state.resetting).sum())  # an autoreset step moves no game forward
        state.resetting, state.obs = terminated | truncated, next_obs
        record_episodes(run.writer, infos, state)

        learn(args, setup, state)
        if crossed(before, state.global_step, args.target_network_frequency):
            setup.target_network.load_state_dict(setup.q_network.state_dict())
            n_states = min(4 * args.batch_size, args.target_network_frequency - 1)  # the authors' stat_batch_size
            if n_states > 0 and setup.rb.valid.any():
                state.gap_record.append(measure_action_gap(setup.q_network, setup.rb, n_states, state.gap_rng))
        if crossed(before, state.global_step, args.log_interval):
            log_training(run, setup, state, epsilon)
        if crossed(before, state.global_step, args.eval_interval):
            periodic_evaluation(args, run, setup, state)
        run.report_progress(state.global_step, state.episodes, state.recent_returns, state.updates_from[0])
        # an env due to autoreset cannot be saved: a due checkpoint waits for the step after
        if run.checkpoint_due(before, state.global_step) and not state.resetting.any():
            save_checkpoint(args, run, setup, state)
            run.checkpoint_written()  # after SIGINT, SIGTERM or SIGUSR1: exits here
    if state.global_step > run.progress.start_step:
        save_checkpoint(args, run, setup, state)  # the end of training: a final evaluation cut short, or a longer run, goes on
    setup.envs.close()
    run.training_ended()


def save_checkpoint(args: Args, run: longrun.Run, setup: TrainingSetup, state: LoopState):
    """The checkpoint: everything the loop needs to go on exactly as if it had never stopped (longrun.py writes it)."""
    check_finite(run, setup, state)
    run.save_checkpoint({**vars(state), "q_network": setup.q_network.state_dict(),
                         "target_network": setup.target_network.state_dict(), "optimizer": setup.optimizer.state_dict(),
                         "envs": setup.envs.get_attr("snapshot"), "eval_env": setup.eval_env.snapshot,
                         "rng": longrun.rng_states(setup.device), "explore_rng": setup.rng.bit_generator.state,
                         "eval_rng": setup.eval_rng.bit_generator.state,
                         "replay": setup.rb.state_dict() if args.checkpoint_buffer else None}, state.global_step)


RENAMED_FIELDS = {"starting": "resetting", "update_origin": "updates_from"}  # in checkpoints before 2026-12-05


def restore_checkpoint(args: Args, run: longrun.Run, setup: TrainingSetup, state: LoopState) -> LoopState:
    """Continues exactly where the checkpoint (run.resumed, save_checkpoint's dict) left off."""
    saved = {RENAMED_FIELDS.get(name, name): value for name, value in run.resumed.items()}
    # the saved fields over the fresh state (a field newer than the checkpoint keeps its fresh value)
    state = dataclasses.replace(state, **{f.name: saved[f.name] for f in dataclasses.fields(state) if f.name in saved})
    copy_out = lambda t: t.to(setup.device, copy=True)  # noqa: E731 (out of the file, which the next checkpoint replaces)
    state.sums, state.bad_step, state.q_record = copy_out(state.sums), copy_out(state.bad_step), copy_out(state.q_record)
    state.updates_from = tuple(state.updates_from)
    if state.best_state is not None:
        state.best_state = {name: copy_out(value) for name, value in state.best_state.items()}
    setup.q_network.load_state_dict(saved["q_network"])
    setup.target_network.load_state_dict(saved["target_network"])
    setup.optimizer.load_state_dict(saved["optimizer"])
    setup.envs.set_attr("snapshot", list(saved["envs"]))
    setup.eval_env.snapshot = saved["eval_env"]
    if state.resetting.any():  # only a final checkpoint has envs due to autoreset: their next step() is that reset
        setup.envs.set_attr("reset_on_next_step", state.resetting.tolist())
    longrun.set_rng_states(saved["rng"], setup.device)
    setup.rng.bit_generator.state, setup.eval_rng.bit_generator.state = saved["explore_rng"], saved["eval_rng"]
    if saved["replay"] is not None:
        setup.rb.load_state_dict(saved["replay"])
    else:  # a checkpoint without the buffer: collect --learning-starts transitions again before learning
        setup.rb.start_episodes(state.obs[:, -1])
        state.updates_from = (state.global_step + args.learning_starts, state.updates)
    print(f"resumed {run.dir} at step {state.global_step:,}")
    return state


def check_finite(run: longrun.Run, setup: TrainingSetup, state: LoopState):
    """Stops the run (keeping its last good checkpoint) once a loss, a Q-value or a weight is not finite. A device sync:
    at log points and checkpoints only."""
    weights_finite = bool(torch.stack([w.isfinite().all() for w in setup.q_network.parameters()]).all())
    run.stop_if_not_finite(int(state.bad_step), weights_finite, state.global_step)


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


def learn(args: Args, setup: TrainingSetup, state: LoopState):
    """The updates now due: updates per agent step stay 1/train_frequency whatever the number of envs."""
    origin_step, origin_updates = state.updates_from
    if state.global_step <= origin_step:  # learning has not started yet
        return
    while state.updates < origin_updates + (state.global_step - origin_step) // args.train_frequency:
        batch = setup.rb.sample(args.batch_size)
        *losses, q_values = update(setup.q_network, setup.target_network, setup.optimizer, batch, args, setup.loss_fn)
        stats = torch.stack(losses)
        state.sums += stats
        record_q(state, q_values)
        first_bad = (state.bad_step < 0) & ~stats.isfinite().all()  # on the device: no sync
        state.bad_step = torch.where(first_bad, state.global_step, state.bad_step)
        state.updates += 1


def log_training(run: longrun.Run, setup: TrainingSetup, state: LoopState, epsilon: float):
    """TensorBoard: means over the updates since the last point, rate, epsilon. Here (.tolist(), check_finite) and
    at checkpoints are the loop's only device syncs."""
    step, writer = state.global_step, run.writer
    if state.updates > state.logged_updates:
        loss, q_mean, gap = (state.sums / (state.updates - state.logged_updates)).tolist()
        check_finite(run, setup, state)
        writer.add_scalar("losses/td_loss", loss, step)
        writer.add_scalar("losses/q_values", q_mean, step)
        writer.add_scalar("metrics/action_gap", gap, step)
        state.sums.zero_()
        state.logged_updates = state.updates
    writer.add_scalar("charts/SPS", run.progress.training_rate(step), step)
    writer.add_scalar("charts/epsilon", epsilon, step)
    writer.add_scalar("charts/updates", state.updates, step)


def periodic_evaluation(args: Args, run: longrun.Run, setup: TrainingSetup, state: LoopState):
    """Evaluates the online network and keeps the best one, which the protocol's final evaluation plays."""
    started = time.time()
    result = evaluate(setup.q_network, setup.eval_env, setup.device, args.eval_epsilon, args.gamma, setup.eval_rng,
                      max_steps=args.eval_steps)
    run.progress.eval_time += time.time() - started  # not training time
    state.evaluations += 1
    score = float(np.mean(result["scores"]))
    run.writer.add_scalar("eval/episodic_return", score, state.global_step)
    for key in EVAL_LOGGED:
        if result[key] is not None:  # None: no episode finished within --eval-steps
            run.writer.add_scalar(f"eval/{key}", result[key], state.global_step)
    claims = claim_statistics(state)
    for key, value in claims.items():
        if value is not None:
            run.writer.add_scalar(f"claims/{key}", value, state.global_step)
    if score > state.best_score:
        state.best_score, state.best_step = score, state.global_step
        state.best_state = copy.deepcopy(setup.q_network.state_dict())
    over = "n/a (no episode finished)" if result["overestimation"] is None else f"{result['overestimation']:.3f}"
    gap = "n/a" if claims["relative_action_gap"] is None else f"{claims['relative_action_gap']:.4f}"
    print(f"evaluation {state.evaluations} at step {state.global_step:,}: mean score {score:.1f} over "
          f"{len(result['scores'])} episodes, overestimation {over}, relative action gap {gap}")


def final_evaluation(args: Args, run: longrun.Run, setup: TrainingSetup, state: LoopState):
    """The best network (the last one without periodic evaluations) plays --final-eval-episodes games: final_eval.json."""
    if args.save_model:
        run.save_network(f"{args.exp_name}.cleanrl_model", setup.q_network.state_dict())
        if state.best_state is not None:
            run.save_network(f"{args.exp_name}_best.cleanrl_model", state.best_state)
        else:  # the final network is the one the final evaluation plays
            print(f"no periodic evaluation (--eval-interval {args.eval_interval}): no {args.exp_name}_best.cleanrl_model")
    use_best = state.best_state is not None
    if use_best:
        setup.q_network.load_state_dict(state.best_state)
    result = evaluate(setup.q_network, setup.eval_env, setup.device, args.eval_epsilon, args.gamma, setup.eval_rng,
                      max_episodes=args.final_eval_episodes)
    setup.eval_env.close()
    run.finish({
        "algo": ALGO, "env_id": args.env_id, "seed": args.seed, "me_coef": setup.me_coef, "total_steps": state.global_step,
        "network": f"best periodic evaluation (step {state.best_step})" if use_best else "final",
        "network_step": state.best_step if use_best else state.global_step, "epsilon": args.eval_epsilon,
        **final_statistics(result),
    })


if __name__ == "__main__":
    main(parse_args())
