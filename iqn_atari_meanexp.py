"""IQN (Implicit Quantile Networks) with a mean-expansion head on Atari: one file, read top to bottom.

    python iqn_atari_meanexp.py --env-id ALE/Breakout-v5              # mean-expansion, k = |A|
    python iqn_atari_meanexp.py --env-id ALE/Breakout-v5 --me-coef 0  # plain IQN

IQN learns the quantile function of the return: for a quantile level tau in (0, 1) the
network gives Z(s, tau, a), and Q(s, a) is its mean over tau. The mean-expansion layer
("Accelerating Q-learning through Efficient Value-Sharing across Actions", Nagarajan et
al., ICML 2026) is applied over the actions of every quantile sample:

    Z(s, tau, a) = u(s, tau, a) + k * mean_b u(s, tau, b)

It is the function `mean_expansion` below and the last line of `IQNNetwork.quantiles`;
everything else is IQN as PFRL's Atari reproduction runs it (defaults = that protocol, see
README.md). Environment, replay buffer, evaluation and logging are word for word those of
dqn_atari_meanexp.py.

Layout: Args -> environment -> mean-expansion head and network -> replay buffer ->
loss and update -> evaluation -> logging -> training loop.
"""

import atexit
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
from typing import NamedTuple, Optional

import ale_py
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from stable_baselines3.common.atari_wrappers import (
    EpisodicLifeEnv,
    FireResetEnv,
    MaxAndSkipEnv,
    NoopResetEnv,
    WarpFrame,
)
from torch.utils.tensorboard import SummaryWriter

gym.register_envs(ale_py)  # makes the ALE/... and ...NoFrameskip-v4 ids known to gymnasium

ALGO = "iqn"


@dataclass
class Args:
    exp_name: str = "iqn_atari_meanexp"
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
    """at most this many no-op frames at the start of each episode (0: none, as in the authors' code; DQN papers often use 30)"""
    frame_skip: int = 4
    """emulator frames per agent step (the action repeats, the observation is the max of the last two frames)"""
    max_episode_steps: int = 27_000
    """an episode is truncated after this many agent steps (27,000 steps = 108,000 frames)"""

    # Algorithm
    me_coef: Optional[float] = None
    """the mean-expansion coefficient k; default the number of actions |A|; 0 is plain IQN"""
    total_timesteps: int = 50_000_000
    """total agent steps (summed over all envs)"""
    learning_rate: float = 5e-5
    """the learning rate of Adam (the paper's IQN: 5e-5)"""
    optimizer_eps: float = 0.01 / 32
    """the epsilon of Adam (the paper's IQN: 0.01 / batch size 32)"""
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
    num_tau_samples: int = 64
    """N: quantile levels sampled for the online network in the loss"""
    num_tau_prime_samples: int = 64
    """N': quantile levels sampled for the target network in the loss"""
    num_quantile_samples: int = 32
    """K: quantile levels sampled to estimate Q (the mean over tau) when acting and picking the target action"""
    quantile_embedding_dim: int = 64
    """number of cosine features cos(i * pi * tau), i = 1..n, embedding each tau"""
    kappa: float = 1.0
    """the threshold of the quantile Huber loss"""

    # Evaluation and logging
    eval_interval: int = 250_000
    """agent steps between evaluations (0: no periodic evaluation)"""
    eval_steps: int = 125_000
    """agent steps per periodic evaluation (only whole episodes are scored)"""
    eval_epsilon: float = 0.001
    """epsilon of the epsilon-greedy policy during evaluation"""
    final_eval_episodes: int = 200
    """episodes the best network plays at the end (written to final_eval.json)"""
    log_interval: int = 1_000
    """agent steps between TensorBoard points of losses and metrics"""
    progress_interval: float = 30.0
    """seconds between console progress lines"""

    # Checkpoints: a long run survives preemption and time limits (README.md, "Long runs")
    checkpoint_interval: int = 1_000_000
    """agent steps between checkpoints to runs/{run_name}/checkpoint.pt (0: only at the start, the end and on SIGTERM/SIGUSR1)"""
    checkpoint_buffer: bool = True
    """whether checkpoints hold the replay buffer (7 GB when full); without it a resumed run refills it before learning"""
    resume: Optional[str] = None
    """a run directory to continue from its checkpoint, with the run's own settings (only a few flags may change)"""


FIXED_SETTINGS = {"loss": "quantile_huber", "optimizer": "adam", "network": "iqn"}  # what config.json records besides the flags


def algo_errors(args: Args) -> list:
    """The checks of this algorithm's own flags (check_args below does the rest)."""
    positive = ("num_tau_samples", "num_tau_prime_samples", "num_quantile_samples", "quantile_embedding_dim", "kappa")
    return [f"--{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})" for name in positive if not getattr(args, name) > 0]


# ---------------------------------------------------------------------------
# Checking the command line: every mistake is reported before anything is allocated
# ---------------------------------------------------------------------------


def check_args(args: Args) -> list:
    """Returns one message per bad setting (empty when all are fine)."""
    errors = []
    if args.env_id not in gym.registry:
        close = difflib.get_close_matches(args.env_id, [i for i in gym.registry if "ALE/" in i or "NoFrameskip-v4" in i])
        hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "use e.g. ALE/Breakout-v5 or BreakoutNoFrameskip-v4"
        errors.append(f"--env-id {args.env_id!r} is not a registered gymnasium id; {hint}")
    elif "ale_py" not in str(gym.registry[args.env_id].entry_point):
        errors.append(f"--env-id {args.env_id!r} is not an Atari (ale-py) game; use e.g. ALE/Breakout-v5")
    positive = ["total_timesteps", "num_envs", "buffer_size", "batch_size", "target_network_frequency", "train_frequency",
                "frame_skip", "max_episode_steps", "eval_steps", "final_eval_episodes", "log_interval", "learning_rate", "optimizer_eps",
                "progress_interval"]
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
    return errors + algo_errors(args)


RESUME_MAY_CHANGE = ("total_timesteps", "checkpoint_interval", "checkpoint_buffer", "progress_interval", "cuda", "save_model",
                     "compile")
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
    """The command line. With --resume RUN_DIR, the flags not given take the run's saved settings, not the defaults."""
    args = tyro.cli(Args, args=argv)
    config = read_config(args.resume) if args.resume is not None else None
    if config is None:
        return args  # main() explains what is wrong with --resume
    saved = {field.name: config[field.name] for field in dataclasses.fields(Args) if field.name in config}
    return tyro.cli(Args, args=argv, default=Args(**{**saved, "resume": args.resume}))


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


# ---------------------------------------------------------------------------
# Environment: gymnasium + ale-py, preprocessed with Stable-Baselines3's Atari wrappers
# ---------------------------------------------------------------------------


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
        if args.sticky_action_prob > 0:  # per frame, like ALE's own (Machado et al. 2018), but the action it repeats is
            env = gym.wrappers.StickyAction(env, args.sticky_action_prob)  # Python state a checkpoint saves (ALE's is not)
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
        env = WarpFrame(env)  # 84x84 grayscale, shape (84, 84, 1)
        env = gym.wrappers.ReshapeObservation(env, (84, 84))
        env = gym.wrappers.FrameStackObservation(env, 4)  # (4, 84, 84); an episode's first frame pads its first stacks
        env = SnapshotEnv(env)
        env.action_space.seed(seed)
        return env

    return thunk


class SnapshotEnv(gym.Wrapper):
    """The outermost wrapper: `env.snapshot` is the whole env's state as bytes, and assigning it restores
    that state, so a resumed run plays on exactly as if never stopped. (A property, so that a vector env
    reaches it in its worker processes with get_attr and set_attr.)"""

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


def make_train_envs(args: Args, run_dir: str):
    """N training envs stepped together. Autoreset is NEXT_STEP: the step after an episode ends
    returns the new episode's first observation (its action is ignored) instead of a transition."""
    thunks = [make_env(args, args.seed + i, args.capture_video and i == 0, run_dir) for i in range(args.num_envs)]
    if args.num_envs == 1:
        return gym.vector.SyncVectorEnv(thunks, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    thunks = [leave_signals_to_main_process(thunk) for thunk in thunks]
    return gym.vector.AsyncVectorEnv(thunks, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


# ---------------------------------------------------------------------------
# The mean-expansion head and the network
# ---------------------------------------------------------------------------


def mean_expansion(values: torch.Tensor, coef: float) -> torch.Tensor:
    """Q = u + k * mean_b u(b) over the last (action) dimension. k = 0 is the identity."""
    return values + coef * values.mean(dim=-1, keepdim=True)


class IQNNetwork(nn.Module):
    """Nature CNN features psi(s), times an embedding phi(tau) of each quantile level, -> FC 512
    -> Linear(512, |A|) raw values u(s, tau, .) -> mean-expansion over actions, per tau -> Z."""

    def __init__(self, n_actions: int, me_coef: float, embedding_dim: int = 64, num_quantile_samples: int = 32):
        super().__init__()
        self.me_coef, self.num_quantile_samples = me_coef, num_quantile_samples
        self.torso = nn.Sequential(
            nn.Conv2d(4, 32, 8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.register_buffer("i_pi", torch.arange(1, embedding_dim + 1) * torch.pi)  # cos(i * pi * tau), i = 1..n
        self.tau_embedding = nn.Sequential(nn.Linear(embedding_dim, 3136), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(3136, 512), nn.ReLU(), nn.Linear(512, n_actions))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.torso(x.float() / 255.0)  # x: uint8 frames (batch, 4, 84, 84) -> (batch, 3136)

    def quantiles(self, psi: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        """Z for every sampled tau: psi (batch, 3136), taus (batch, T) -> (batch, T, |A|)."""
        phi = self.tau_embedding(torch.cos(taus[..., None] * self.i_pi))  # (batch, T, 3136)
        u = self.head(psi[:, None, :] * phi)
        return mean_expansion(u, self.me_coef)  # the mean is over actions only, separately for each tau

    def forward(self, x: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        return self.quantiles(self.features(x), taus)

    def q_values(self, x: torch.Tensor) -> torch.Tensor:
        """Q(s, .) = mean over K sampled taus of Z(s, tau, .): what acting and evaluation use."""
        taus = torch.rand(len(x), self.num_quantile_samples, device=x.device)
        return self(x, taus).mean(dim=1)


def make_network(args: Args, n_actions: int, me_coef: float) -> nn.Module:
    """The one place the training loop learns which network class it trains."""
    return IQNNetwork(n_actions, me_coef, args.quantile_embedding_dim, args.num_quantile_samples)


def default_me_coef(args: Args, n_actions: int) -> float:
    """k when --me-coef is not given: |A|, as the authors' IB-IQN."""
    return float(n_actions)


# ---------------------------------------------------------------------------
# Replay buffer: each 84x84 frame stored once, 4-frame stacks rebuilt when sampling
# ---------------------------------------------------------------------------


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
    FIELDS = {  # per-slot bookkeeping besides the frame: name -> dtype
        "actions": np.uint8,  # Atari has at most 18 actions
        "rewards": np.float32,
        "terminated": np.bool_,
        "truncated": np.bool_,
        "history": np.uint8,
        "valid": np.bool_,  # a sampleable transition starts here: its next frame is stored, its stack intact
    }

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


# ---------------------------------------------------------------------------
# Loss and update: the learning algorithm itself, which the mean-expansion head does not change
# ---------------------------------------------------------------------------


def action_gap(q: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of (largest Q - second largest Q)."""
    top2 = q.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]).mean()


def quantile_huber_loss(z: torch.Tensor, taus: torch.Tensor, target: torch.Tensor, kappa: float) -> torch.Tensor:
    """IQN's loss: z (batch, N) online quantiles at levels taus (batch, N), target (batch, N') samples.

    For every pair, delta = target_j - z_i weighs the Huber loss L_kappa(delta) / kappa by
    |tau_i - 1{delta < 0}|; pairs are summed over the N online samples and averaged over the
    N' target samples and the batch.
    """
    delta = target[:, None, :] - z[:, :, None]  # (batch, N, N')
    huber = torch.where(delta.abs() <= kappa, 0.5 * delta**2, kappa * (delta.abs() - 0.5 * kappa))
    weight = (taus[:, :, None] - (delta.detach() < 0).float()).abs()
    return (weight * huber / kappa).sum(dim=1).mean()


def iqn_loss(q_network: nn.Module, target_network: nn.Module, batch: Batch, args: Args):
    """Quantile Huber loss against r + gamma * Z_target(s', tau', a*), a* greedy for the target
    network's Q estimated from K taus (PFRL's IQN).

    Rewards are clipped to their sign; a truncated episode bootstraps, a terminated one does not.
    Returns (loss, Z(s, tau, .) of the online network for its N taus).
    """
    n = len(batch.actions)
    with torch.no_grad():
        psi_next = target_network.features(batch.next_obs)
        next_q = target_network.quantiles(psi_next, torch.rand(n, args.num_quantile_samples, device=psi_next.device)).mean(dim=1)
        next_z = target_network.quantiles(psi_next, torch.rand(n, args.num_tau_prime_samples, device=psi_next.device))
        next_z = next_z[torch.arange(n), :, next_q.argmax(dim=1)]  # (batch, N')
        target = torch.sign(batch.rewards)[:, None] + args.gamma * (1.0 - batch.terminated)[:, None] * next_z
    taus = torch.rand(n, args.num_tau_samples, device=target.device)
    z = q_network(batch.obs, taus)  # (batch, N, |A|)
    z_taken = z[torch.arange(n), :, batch.actions]  # (batch, N)
    return quantile_huber_loss(z_taken, taus, target, args.kappa), z


def update(q_network, target_network, optimizer, batch: Batch, args: Args):
    """One gradient step. Returns (loss, mean Q of the taken actions, action gap), all still on the device."""
    loss, z = iqn_loss(q_network, target_network, batch, args)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    q = z.detach().mean(dim=1)  # Q = mean over tau
    return loss.detach(), q.gather(1, batch.actions[:, None]).mean(), action_gap(q)


def make_optimizer(args: Args, network: nn.Module) -> torch.optim.Optimizer:
    # fused: the same Adam, one kernel for all parameters instead of a loop over them (12x faster on CPU, benchmarks/)
    return torch.optim.Adam(network.parameters(), lr=args.learning_rate, eps=args.optimizer_eps, fused=True)


# ---------------------------------------------------------------------------
# Evaluation: raw game scores and overestimation, on an env of its own
# ---------------------------------------------------------------------------


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    if duration <= 0:
        return end_e
    return start_e + (end_e - start_e) * min(t / duration, 1.0)


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
        recording the estimate that picked the action would bias the recorded Q upward (a winner's curse)."""
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


EVAL_STATISTICS = ("overestimation", "normalized_overestimation", "mean_q", "mean_return", "mean_discounted_return")


# ---------------------------------------------------------------------------
# Logging and checkpoints
# ---------------------------------------------------------------------------


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
        versions={"torch": torch.__version__, "gymnasium": gym.__version__, "ale_py": ale_py.__version__, "numpy": np.__version__},
        command=" ".join(sys.argv),
    )
    return settings


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def crossed(before: int, after: int, interval: int) -> int:
    """How many multiples of interval lie in (before, after]: events due as the step count advances."""
    return after // interval - before // interval if interval > 0 else 0


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


def fail(errors: list, code: int = EXIT_BAD_INPUT):
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


# ---------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------


def main(args: Args):
    """Trains, evaluates and writes the run. Takes the Args of parse_args(): with --resume, its settings are the run's."""
    errors = check_args(args) + (check_resume(args) if args.resume is not None else [])
    if errors:
        fail(errors)
    resumed = None  # the checkpoint we continue from: its tensors stay in the file (mmap) until copied into place
    if args.resume is not None:
        resumed = torch.load(os.path.join(args.resume, CHECKPOINT), map_location="cpu", weights_only=False, mmap=True)
        if resumed["global_step"] > args.total_timesteps:
            fail([f"--total-timesteps {args.total_timesteps} is below the {resumed['global_step']} steps the run has done"])
        if resumed["global_step"] == args.total_timesteps and os.path.exists(os.path.join(args.resume, "final_eval.json")):
            print(f"{args.resume} is finished ({args.total_timesteps:,} steps and final_eval.json): nothing to do "
                  "(a larger --total-timesteps extends it)")
            return
    probe = make_env(args, args.seed)()  # one env to learn |A| before anything large is allocated
    n_actions = int(probe.action_space.n)
    probe.close()
    me_coef = default_me_coef(args, n_actions) if args.me_coef is None else float(args.me_coef)
    replay_bytes, free_bytes = ReplayBuffer.bytes_needed(args.buffer_size, args.num_envs), available_memory_bytes()
    print(f"replay buffer: {args.buffer_size:,} transitions need {replay_bytes / 1e9:.2f} GB "
          f"({replay_bytes / args.buffer_size:,.0f} bytes each); {free_bytes / 1e9:.2f} GB available")
    if replay_bytes + HEADROOM_BYTES > free_bytes:  # numpy commits the pages only as they fill: refuse now, not hours in
        fail([f"--buffer-size {args.buffer_size} needs {replay_bytes / 1e9:.2f} GB (plus {HEADROOM_BYTES / 1e9:.0f} GB for "
              f"the rest of the run) but only {free_bytes / 1e9:.2f} GB of memory is available; lower --buffer-size "
              f"(each transition takes about 7 kB)"])
    if resumed is None:
        run_name = args.run_name or f"{args.env_id.replace('/', '-')}__{args.exp_name}__k{me_coef:g}__{args.seed}__{int(time.time())}"
        run_dir = os.path.join("runs", run_name)
        if os.path.exists(run_dir):
            fail([f"run directory {run_dir} already exists; choose another --run-name (nothing was overwritten)"])
    else:
        run_dir, run_name = args.resume, args.run_name
    checkpoint_path = os.path.join(run_dir, CHECKPOINT)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    rng = np.random.default_rng(args.seed)  # exploration draws

    stop_signals = []  # SIGTERM or SIGUSR1 (a batch system's warning): checkpoint and exit at the next safe point
    previous_handlers = {sig: signal.signal(sig, lambda signum, frame: stop_signals.append(signum))
                         for sig in (signal.SIGTERM, signal.SIGUSR1)}  # from before the run directory exists
    settings = effective_settings(args, run_name, n_actions, me_coef, device)
    if resumed is None:
        os.makedirs(run_dir)
    else:  # the first command stays; each resume is recorded after it
        previous = read_config(run_dir)
        resume = {"step": resumed["global_step"], "time": time.time(), "command": settings["command"], "device": str(device)}
        # me_coef_default too: the resumed Args hold the run's k as a number, but whether it was |A| by default stays
        settings.update(command=previous["command"], me_coef_default=previous["me_coef_default"],
                        resumes=previous.get("resumes", []) + [resume])
    write_json(os.path.join(run_dir, "config.json"), settings)
    # on resume, TensorBoard drops what a killed process logged after the checkpoint: no step twice, none missing
    writer = SummaryWriter(run_dir, purge_step=None if resumed is None else resumed["global_step"] + 1)
    if resumed is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in settings.items()))

    envs = make_train_envs(args, run_dir)
    atexit.register(envs.close)  # however the run ends: the workers ignore SIGTERM, so only this stops them
    eval_seed = 2**31 - 1 - args.seed  # the authors' evaluation seed
    eval_env = make_env(args, eval_seed, evaluation=True)()
    eval_env.reset(seed=eval_seed)  # seeds the eval games once; later resets continue its RNG
    eval_rng = np.random.default_rng(eval_seed)
    q_network = make_network(args, n_actions, me_coef).to(device)
    target_network = copy.deepcopy(q_network)
    if args.compile:  # in place: state_dicts keep their keys; one static graph per batch shape (acting, evaluation, training)
        q_network.compile(dynamic=False)
        target_network.compile(dynamic=False)
    optimizer = make_optimizer(args, q_network)
    rb = ReplayBuffer(args.buffer_size, args.num_envs, device, seed=args.seed)
    print(f"{ALGO} k={me_coef:g} on {args.env_id} ({n_actions} actions), {args.num_envs} env(s), device {device}, logs in {run_dir}")

    obs, _ = envs.reset(seed=args.seed)
    starting = np.zeros(args.num_envs, dtype=bool)  # envs whose next step() is an autoreset, not a transition
    global_step, updates, logged_updates, episodes, evaluations = 0, 0, 0, 0, 0
    update_origin = (args.learning_starts, 0)  # (step, updates): one update per train_frequency steps after it
    best_score, best_state, best_step = -float("inf"), None, None
    sums = torch.zeros(3, device=device)  # loss, Q, action gap, summed on the device between log points
    bad_step = torch.tensor(-1, device=device)  # the first step whose loss or Q was not finite, read at log points
    recent_returns = []
    checkpoint_step = None if resumed is None else resumed["global_step"]  # of the last checkpoint written
    if resumed is None:
        rb.add(obs[:, -1], np.ones(args.num_envs, bool), *([np.zeros(args.num_envs)] * 4))
    else:  # continue exactly where the checkpoint left off
        global_step, updates, logged_updates = resumed["global_step"], resumed["updates"], resumed["logged_updates"]
        episodes, evaluations, recent_returns = resumed["episodes"], resumed["evaluations"], resumed["recent_returns"]
        best_score, best_step = resumed["best_score"], resumed["best_step"]
        if resumed["best_state"] is not None:  # copied out of the checkpoint file, which the next checkpoint replaces
            best_state = {name: value.to(device, copy=True) for name, value in resumed["best_state"].items()}
        update_origin, sums = tuple(resumed["update_origin"]), resumed["sums"].to(device, copy=True)
        q_network.load_state_dict(resumed["q_network"])
        target_network.load_state_dict(resumed["target_network"])
        optimizer.load_state_dict(resumed["optimizer"])
        envs.set_attr("snapshot", list(resumed["envs"]))
        eval_env.snapshot = resumed["eval_env"]
        obs, starting = resumed["obs"], resumed["starting"]
        if starting.any():  # only a final checkpoint has envs due to autoreset: extending the run resets them here
            obs[starting] = envs.reset(options={"reset_mask": starting})[0][starting]
        set_rng_states(resumed["rng"], device)
        rng.bit_generator.state, eval_rng.bit_generator.state = resumed["explore_rng"], resumed["eval_rng"]
        if resumed["replay"] is not None:
            rb.load_state_dict(resumed["replay"])
        else:  # a checkpoint without the buffer: collect --learning-starts transitions again before learning
            rb.add(obs[:, -1], np.ones(args.num_envs, bool), *([np.zeros(args.num_envs)] * 4))
            update_origin = (global_step + args.learning_starts, updates)
        print(f"resumed {run_dir} at step {global_step:,}")
        del resumed  # closes the file's memory map

    def check_finite():
        """Stops the run, keeping the last good checkpoint, once a loss, a Q-value or a weight is not finite."""
        step = int(bad_step)  # a device sync: only at log points and checkpoints
        weights_ok = bool(torch.stack([p.isfinite().all() for p in q_network.parameters()]).all())
        if step >= 0 or not weights_ok:
            where = f"at step {step:,}" if step >= 0 else f"in the network's weights by step {global_step:,}"
            kept = f"its last good checkpoint, of step {checkpoint_step:,}, is kept in {checkpoint_path}"
            writer.close()
            fail([f"a loss or Q-value that is not finite appeared {where}; the run stops ({kept})"], EXIT_NON_FINITE)

    def exit_for_requeue(signum, frame=None):
        """After a checkpoint: says how to continue, then exits with the code a batch system requeues on."""
        writer.close()
        print(f"signal {signal.Signals(signum).name}: checkpoint at step {checkpoint_step:,} in {checkpoint_path}; "
              f"continue with --resume {run_dir} (exit code {EXIT_REQUEUE})", flush=True)
        sys.exit(EXIT_REQUEUE)

    def checkpoint():
        """Writes everything the loop needs to go on exactly as if it had never stopped."""
        nonlocal checkpoint_step
        check_finite()
        writer.flush()  # the events up to this step are on disk before the checkpoint that follows them
        state = {
            "algo": ALGO, "global_step": global_step, "updates": updates, "logged_updates": logged_updates,
            "episodes": episodes, "evaluations": evaluations, "recent_returns": recent_returns,
            "best_score": best_score, "best_state": best_state, "best_step": best_step,
            "update_origin": update_origin, "sums": sums,
            "q_network": q_network.state_dict(), "target_network": target_network.state_dict(), "optimizer": optimizer.state_dict(),
            "envs": envs.get_attr("snapshot"), "eval_env": eval_env.snapshot, "obs": obs, "starting": starting,
            "rng": rng_states(device), "explore_rng": rng.bit_generator.state, "eval_rng": eval_rng.bit_generator.state,
            "replay": rb.state_dict() if args.checkpoint_buffer else None,
        }
        atomic_save(checkpoint_path, lambda tmp: torch.save(state, tmp))
        checkpoint_step = global_step

    if global_step == 0:
        checkpoint()  # a run killed before its first periodic checkpoint can still be resumed
    checkpoint_due = False
    start_step, start_time = global_step, time.time()
    last_print, eval_time = start_time, 0.0
    while global_step < args.total_timesteps:
        # Act: epsilon-greedy, one coin per env
        epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_steps, global_step)
        actions = rng.integers(n_actions, size=args.num_envs)
        greedy = rng.random(args.num_envs) >= epsilon
        if greedy.any():
            with torch.no_grad():
                q = q_network.q_values(torch.as_tensor(obs, device=device))
            actions = np.where(greedy, q.argmax(dim=1).cpu().numpy(), actions)
        next_obs, rewards, terminated, truncated, infos = envs.step(actions)
        rb.add(next_obs[:, -1], starting, actions, rewards, terminated, truncated)
        before = global_step
        global_step += int((~starting).sum())  # an autoreset step moves no game forward
        starting = terminated | truncated
        obs = next_obs

        if "episode" in infos:
            for i in np.flatnonzero(infos["_episode"]):
                writer.add_scalar("charts/episodic_return", infos["episode"]["r"][i], global_step)
                writer.add_scalar("charts/episodic_length", infos["episode"]["l"][i], global_step)
                recent_returns = (recent_returns + [float(infos["episode"]["r"][i])])[-20:]
                episodes += 1

        # Learn: updates per agent step stay 1/train_frequency whatever the number of envs
        if global_step > update_origin[0]:
            due = update_origin[1] + (global_step - update_origin[0]) // args.train_frequency
            while updates < due:
                stats = torch.stack(update(q_network, target_network, optimizer, rb.sample(args.batch_size), args))
                sums += stats
                bad_step = torch.where((bad_step < 0) & ~stats.isfinite().all(), global_step, bad_step)  # no sync
                updates += 1
        if crossed(before, global_step, args.target_network_frequency):
            target_network.load_state_dict(q_network.state_dict())

        if crossed(before, global_step, args.log_interval):
            if updates > logged_updates:  # means over the updates since the last point; .tolist() is the one sync
                loss, q_mean, gap = (sums / (updates - logged_updates)).tolist()
                check_finite()
                writer.add_scalar("losses/td_loss", loss, global_step)
                writer.add_scalar("losses/q_values", q_mean, global_step)
                writer.add_scalar("metrics/action_gap", gap, global_step)
                sums.zero_()
                logged_updates = updates
            sps = (global_step - start_step) / max(time.time() - start_time - eval_time, 1e-9)
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("charts/epsilon", epsilon, global_step)
            writer.add_scalar("charts/updates", updates, global_step)

        if crossed(before, global_step, args.eval_interval):
            eval_start = time.time()
            result = evaluate(q_network, eval_env, device, args.eval_epsilon, args.gamma, eval_rng, max_steps=args.eval_steps)
            eval_time += time.time() - eval_start
            evaluations += 1
            score = float(np.mean(result["scores"]))
            writer.add_scalar("eval/episodic_return", score, global_step)
            for key in EVAL_STATISTICS + ("truncated_episodes",):
                if result[key] is not None:  # None: no episode finished within --eval-steps
                    writer.add_scalar(f"eval/{key}", result[key], global_step)
            if score > best_score:  # keep the best network, as the protocol's final evaluation plays it
                best_score, best_state, best_step = score, copy.deepcopy(q_network.state_dict()), global_step
            over = "n/a (no episode finished)" if result["overestimation"] is None else f"{result['overestimation']:.3f}"
            print(f"evaluation {evaluations} at step {global_step:,}: mean score {score:.1f} over {len(result['scores'])} episodes, "
                  f"overestimation {over}")

        now = time.time()
        if now - last_print >= args.progress_interval or global_step >= args.total_timesteps:
            last_print, elapsed = now, now - start_time
            eta = (args.total_timesteps - global_step) * elapsed / max(global_step - start_step, 1)
            recent = f"{np.mean(recent_returns):.1f}" if recent_returns else "n/a"
            print(f"step {global_step:,}/{args.total_timesteps:,} ({100 * global_step / args.total_timesteps:.1f}%) | "
                  f"{(global_step - start_step) / elapsed:,.0f} SPS overall | elapsed {format_duration(elapsed)} | "
                  f"ETA {format_duration(eta)} | {episodes:,} episodes, return (last {len(recent_returns)}) {recent}", flush=True)

        checkpoint_due |= bool(crossed(before, global_step, args.checkpoint_interval))
        if (checkpoint_due or stop_signals) and not starting.any():  # an env due to autoreset cannot be saved: wait a step
            checkpoint()
            checkpoint_due = False
            if stop_signals:
                exit_for_requeue(stop_signals[0])
    if global_step > start_step:
        checkpoint()  # the end of training: a final evaluation cut short, or a longer run, resumes from here
    envs.close()
    for sig in previous_handlers:  # the checkpoint now holds the whole run: a signal stops the final evaluation at once
        signal.signal(sig, exit_for_requeue)
    if stop_signals:  # one came on the last training step, while an env was due to autoreset
        exit_for_requeue(stop_signals[0])

    if args.save_model:
        torch.save(q_network.state_dict(), os.path.join(run_dir, f"{args.exp_name}.cleanrl_model"))
        if best_state is not None:
            torch.save(best_state, os.path.join(run_dir, f"{args.exp_name}_best.cleanrl_model"))
    if best_state is not None:
        q_network.load_state_dict(best_state)
    result = evaluate(q_network, eval_env, device, args.eval_epsilon, args.gamma, eval_rng, max_episodes=args.final_eval_episodes)
    eval_env.close()
    scores = result["scores"]
    final = {
        "algo": ALGO,
        "env_id": args.env_id,
        "seed": args.seed,
        "me_coef": me_coef,
        "total_steps": global_step,
        "network": f"best periodic evaluation (step {best_step})" if best_state is not None else "final",
        "network_step": best_step if best_state is not None else global_step,
        "epsilon": args.eval_epsilon,
        "episodes": len(scores),
        "scores": scores,
        "lengths": result["lengths"],
        "mean": float(np.mean(scores)),
        "median": float(np.median(scores)),
        "std": float(np.std(scores)),
        **{key: result[key] for key in EVAL_STATISTICS + ("truncated_episodes",)},
    }
    final_path = os.path.join(run_dir, "final_eval.json")
    if os.path.exists(final_path):  # a run extended with a larger --total-timesteps keeps its earlier result
        previous = json.load(open(final_path))
        os.replace(final_path, os.path.join(run_dir, f"final_eval_step{previous['total_steps']}.json"))
    write_json(final_path, final)
    writer.close()
    print(f"final evaluation: mean {final['mean']:.1f}, median {final['median']:.1f} over {len(scores)} episodes "
          f"-> {final_path}")
    for sig, handler in previous_handlers.items():  # for callers that go on after main(), such as tests
        signal.signal(sig, handler)


if __name__ == "__main__":
    main(parse_args())
