"""DQN with a mean-expansion head on classic control (CleanRL's dqn.py with the layer): one file, read top to bottom.

    python dqn_meanexp.py                # the authors' LunarLander experiment: k = 4, 100k steps, minutes on a CPU
    python dqn_meanexp.py --me-coef 0    # plain DQN
    python dqn_meanexp_sweep.py          # the authors' k sweep: 14 values of k x 10 seeds, then its figure

The mean-expansion layer (Nagarajan et al., ICML 2026) turns the network's raw output u into Q(s, a) = u(s, a) +
k * mean_b u(s, b): every TD update on one action also moves the value all actions of that state share. It is
`mean_expansion` and the last line of `QNetwork.forward`; the rest is DQN as the authors ran it on LunarLander-v3
(brett-daley/me_layer: scripts/classic_control/train_dqn_lunar_lander.py, on PFRL), the defaults below.
"""

import importlib.util
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:  # the defaults are the authors' LunarLander experiment
    exp_name: str = "dqn_meanexp"
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment: the network, the training env and exploration; the evaluation env gets 2^32 - 1 - seed"""
    cuda: bool = False
    """if toggled, use CUDA where there is a GPU. Off by default: a 256-256 MLP acting on one state at a time gains
    nothing from a GPU (docs/lunar_lander.md), and on the CPU a run is the same run as in the sweep, which is CPU-only"""
    track: bool = False
    """if toggled, track the run with Weights & Biases (pip install wandb); WANDB_MODE=offline writes it locally"""
    wandb_project_name: str = "meanexp-classic-control"
    """the wandb project name"""
    wandb_entity: str = ""
    """the wandb entity (team or user; default: your own)"""
    capture_video: bool = False
    """whether to capture videos of training episodes into runs/{run_name}/videos"""
    save_model: bool = False
    """whether to save the final network to runs/{run_name}/{exp_name}.cleanrl_model"""

    env_id: str = "LunarLander-v3"
    """a gymnasium id with a flat Box observation and Discrete actions (its own time limit applies)"""
    me_coef: float = 4.0
    """the mean-expansion coefficient k (the default of the authors' --mel-coeff here); 0 is plain DQN"""
    total_timesteps: int = 100_000
    """total agent steps"""
    learning_rate: float = 1e-3
    """Adam's learning rate (PyTorch's default, which the authors keep)"""
    adam_eps: float = 3.125e-4
    """Adam's epsilon"""
    buffer_size: int = 500_000
    """the replay memory size in transitions"""
    gamma: float = 0.99
    """the discount factor gamma"""
    target_network_frequency: int = 100
    """agent steps between hard copies of the online network into the target network"""
    batch_size: int = 128
    """transitions per update, drawn uniformly without replacement (as PFRL draws them)"""
    start_e: float = 1.0
    """the starting epsilon for exploration"""
    end_e: float = 0.05
    """the ending epsilon for exploration"""
    exploration_steps: int = 10_000
    """agent steps over which epsilon decays linearly from start-e to end-e"""
    learning_starts: int = 1_000
    """updates start once this many transitions are stored"""
    train_frequency: int = 1
    """agent steps per update"""
    obs_divisor: float = 10.0
    """the network sees observations divided by this (the authors' phi)"""
    reward_scale: float = 0.1
    """rewards are multiplied by this for learning and for the overestimation statistics (scores stay raw)"""
    eval_interval: int = 10_000
    """agent steps between greedy evaluations, and one before training (11 points by default)"""
    eval_episodes: int = 100
    """episodes per evaluation"""


def check_args(args: Args, errors: list, flag_prefix: str = "--") -> None:
    """Refuses bad flags before anything is written: names every problem and exits with code 2, as tyro's own errors.
    flag_prefix: how the caller's command line spells these flags (the sweep's: --dqn.)."""
    inf, given = float("inf"), len(errors)
    bounds = {"me_coef": (0, inf), "total_timesteps": (0, inf), "exploration_steps": (0, inf), "batch_size": (1, inf),
              "target_network_frequency": (1, inf), "train_frequency": (1, inf), "eval_interval": (1, inf),
              "eval_episodes": (1, inf), "start_e": (0, 1), "end_e": (0, 1), "gamma": (0, 1)}
    errors = errors + [f"--{n.replace('_', '-')} must be in [{lo}, {hi}], got {getattr(args, n)}"
                       for n, (lo, hi) in bounds.items() if not lo <= getattr(args, n) <= hi]
    finite = ("me_coef", "learning_rate", "adam_eps", "obs_divisor", "reward_scale")  # nan and inf would train to NaN
    errors += [f"--{n.replace('_', '-')} must be a finite number, got {getattr(args, n)}"
               for n in finite if not np.isfinite(getattr(args, n))]
    if not 0 <= args.seed < 2**32 - 1:  # NumPy's seeds; the evaluation env gets 2^32 - 1 - seed
        errors.append(f"--seed must be in [0, 2^32 - 2], got {args.seed}")
    if not args.exp_name or "/" in args.exp_name or args.exp_name in (".", ".."):  # a part of the run directory's name
        errors.append(f"--exp-name {args.exp_name!r} must be a plain name (no '/'), as it names the run's directory")
    if not args.batch_size <= args.learning_starts <= args.buffer_size:  # a batch is drawn without replacement
        errors.append(f"need --batch-size <= --learning-starts <= --buffer-size, got {args.batch_size}, "
                      f"{args.learning_starts}, {args.buffer_size}")
    if not (args.learning_rate > 0 and args.adam_eps > 0 and args.obs_divisor != 0):
        errors.append("--learning-rate and --adam-eps must be > 0, --obs-divisor not 0")
    errors = errors[:given] + [re.sub(r"--(?=[a-z])", flag_prefix, e) for e in errors[given:]]
    if errors:
        print("\n".join(f"error: {e}" for e in errors) + "\n(--help lists every flag)", file=sys.stderr)
        sys.exit(2)


# ==== The mean-expansion head and the network ====
def mean_expansion(values: torch.Tensor, coef) -> torch.Tensor:
    """Q = u + k * mean_b u(b) over the last (action) dimension. k = 0 is the identity."""
    return values + coef * values.mean(dim=-1, keepdim=True)


class QNetwork(nn.Module):
    """obs / obs_divisor -> 256 -> 256 -> |A| raw values u (ReLU between) -> mean-expansion -> Q."""

    def __init__(self, obs_size: int, n_actions: int, me_coef: float, obs_divisor: float = 10.0, hidden: int = 256):
        super().__init__()
        self.me_coef, self.obs_divisor = me_coef, obs_divisor
        self.network = nn.Sequential(nn.Linear(obs_size, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, n_actions))
        for layer in self.network[::2]:  # PFRL's initialization of its MLP: LeCun-normal weights, zero biases
            nn.init.normal_(layer.weight, std=layer.in_features**-0.5)  # std 1/sqrt(fan_in)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mean_expansion(self.network(x / self.obs_divisor), self.me_coef)  # raw values u -> Q


# ==== Environment, replay buffer, loss ====
def make_env(env_id: str, video_dir: str = "") -> gym.Env:
    """One env with raw observations and rewards (the network divides the first, the loop scales the second)."""
    env = gym.make(env_id, render_mode="rgb_array" if video_dir else None)
    env = gym.wrappers.RecordEpisodeStatistics(env)  # each finished episode's raw score, in info["episode"]
    if video_dir:
        env = gym.wrappers.RecordVideo(env, video_dir)
    if not (isinstance(env.action_space, gym.spaces.Discrete) and len(env.observation_space.shape or ()) == 1):
        raise ValueError(f"observations {env.observation_space}, actions {env.action_space}: this script needs a "
                         "flat Box observation and Discrete actions")
    return env


class ReplayBuffer:
    """A ring of transitions (s, a, r, s', terminated), read by index."""

    def __init__(self, capacity: int, obs_size: int):
        self.obs, self.next_obs = np.zeros((2, capacity, obs_size), dtype=np.float32)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards, self.terminated = np.zeros((2, capacity), dtype=np.float32)  # terminated 1: no bootstrap (a cut does)
        self.capacity, self.pos, self.size = capacity, 0, 0

    def add(self, obs, action: int, reward: float, next_obs, terminated: bool):
        i, self.pos, self.size = self.pos, (self.pos + 1) % self.capacity, min(self.size + 1, self.capacity)
        self.obs[i], self.actions[i], self.rewards[i], self.next_obs[i] = obs, action, reward, next_obs
        self.terminated[i] = terminated

    def batch(self, indices: np.ndarray, device: torch.device) -> tuple:
        return tuple(torch.as_tensor(a[indices], device=device)
                     for a in (self.obs, self.actions, self.rewards, self.next_obs, self.terminated))


def td_loss(q_network: nn.Module, target_network: nn.Module, batch: tuple, gamma: float) -> tuple:
    """PFRL's DQN loss with clip_delta off: mean over the batch of delta^2 / 2, delta = r + gamma max Q_target - Q.
    Returns (loss, Q(s, .)), the second for the statistics."""
    obs, actions, rewards, next_obs, terminated = batch
    with torch.no_grad():
        target = rewards + gamma * (1.0 - terminated) * target_network(next_obs).max(dim=1).values
    q = q_network(obs)
    return F.mse_loss(q.gather(1, actions[:, None]).squeeze(1), target) / 2, q


def action_gap(q: torch.Tensor) -> torch.Tensor:
    """Mean over the states of (largest Q - second largest Q): q (..., states, |A|) -> (...)."""
    top2 = q.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]).mean(dim=-1)


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    """PFRL's LinearDecayEpsilonGreedy after t steps."""
    return end_e if t >= duration else start_e + (end_e - start_e) * t / duration


# ==== The authors' statistics for the paper's claims 2 and 3 (their DQN agent's get_statistics) ====
Q_RECORD = 1000  # average_q: the mean of the last 1,000 Q(s, a) of the taken actions in training batches


@torch.no_grad()
def measure_action_gap(q_network: nn.Module, rb: ReplayBuffer, n_states: int, rng: np.random.Generator, device) -> float:
    """The authors' action gap at a target sync: n_states replay states drawn (without replacement, as PFRL) from rng,
    the statistic's own generator, so training's draws never move; eval mode (a no-op for this MLP, as theirs)."""
    q_network.eval()
    gap = action_gap(q_network(torch.as_tensor(rb.obs[rng.choice(rb.size, n_states, replace=False)], device=device)))
    q_network.train()
    return gap.item()


def claim_statistics(recent_q: torch.Tensor, gaps: list) -> dict:
    """An evaluation row's average_q (of the recent training-batch Q values), average_action_gap (the mean of the gaps
    measured at the syncs since the last evaluation) and relative_action_gap = gap / (|average_q| + 1e-8); None where
    nothing was measured yet (the authors' NaN)."""
    average_q = recent_q.double().mean().item() if len(recent_q) else None
    gap = float(np.mean(gaps)) if gaps else None
    relative = gap / (abs(average_q) + 1e-8) if gap is not None and average_q is not None else None
    return {"average_q": average_q, "average_action_gap": gap, "relative_action_gap": relative}


# ==== Evaluation: greedy games on an env of their own; raw scores and the authors' overestimation ====
def episode_statistics(q_taken: list, rewards: list, gamma: float, reward_scale: float, bootstrap: float) -> dict:
    """One evaluation episode as the authors' evaluator sees it. q_taken[t] = Q(s_t, a_t) of the greedy action;
    G_t = reward_scale * r_t + gamma * G_{t+1} from G_T = bootstrap (Q(s_T, greedy) where the time limit cut the
    episode, else 0); overestimation = mean_t (Q - G), normalized by |mean_t Q|."""
    returns, g = np.zeros(len(rewards)), bootstrap
    for t in range(len(rewards) - 1, -1, -1):
        g = reward_scale * rewards[t] + gamma * g
        returns[t] = g
    q = np.asarray(q_taken, dtype=np.float64)
    error = (q - returns).mean()  # = mean Q - mean G
    return {"score": float(sum(rewards)), "length": len(rewards), "overestimation": error,
            "normalized_overestimation": error / abs(q.mean()), "mean_q": q.mean(), "mean_return": returns.mean()}


def summarize(episodes: list) -> dict:
    """An evaluation: the scores' mean, median, stdev (ddof 1, as the authors'), min, max; the rest: means over episodes."""
    scores = np.array([e["score"] for e in episodes])
    stats = {"episodes": len(episodes), "mean": scores.mean(), "median": np.median(scores), "min": scores.min(),
             "max": scores.max(), "stdev": scores.std(ddof=1) if len(scores) > 1 else 0.0,
             "truncated": sum(e["truncated"] for e in episodes)}  # how many episodes the time limit cut
    for key in ("length", "overestimation", "normalized_overestimation", "mean_q", "mean_return"):
        stats[key] = np.mean([e[key] for e in episodes])
    return {key: float(value) for key, value in stats.items()}


@torch.no_grad()
def evaluate(q_network: nn.Module, env: gym.Env, episodes: int, gamma: float, reward_scale: float, device) -> dict:
    """Plays `episodes` greedy games on env, which was seeded once: each evaluation continues its games."""
    finished = []
    for _ in range(episodes):
        (obs, _), q_taken, rewards, terminated, truncated = env.reset(), [], [], False, False
        while not (terminated or truncated):
            q = q_network(torch.as_tensor(obs, device=device))
            action = int(q.argmax())
            q_taken.append(float(q[action]))
            obs, reward, terminated, truncated, _ = env.step(action)
            rewards.append(float(reward))
        # as the authors: a truncated episode bootstraps, even where it also terminated
        bootstrap = float(q_network(torch.as_tensor(obs, device=device)).max()) if truncated else 0.0
        finished.append({**episode_statistics(q_taken, rewards, gamma, reward_scale, bootstrap), "truncated": truncated})
    return summarize(finished)


# ==== The training loop ====
def main(args: Args) -> list:
    """Trains, evaluating before training and every --eval-interval steps; returns the evaluations."""
    try:
        eval_env, env_errors = make_env(args.env_id), []
    except (ValueError, ImportError, gym.error.Error) as e:  # ImportError: an id "module:Env" of a module not installed
        env_errors = [f"--env-id {args.env_id}: {e}"]
    if args.track and importlib.util.find_spec("wandb") is None:
        env_errors.append("--track needs wandb: pip install -r requirements-track.txt")
    check_args(args, env_errors)
    run_dir = f"runs/{args.env_id.replace('/', '_')}__{args.exp_name}__k{args.me_coef:g}__{args.seed}__{int(time.time())}"
    for n in range(2, 1000):  # a run started in the same second as another gets a directory of its own: ..._2, _3, ...
        try:
            os.makedirs(run_dir)
            break
        except FileExistsError:
            run_dir = f"{run_dir.rsplit('__', 1)[0]}__{int(time.time())}_{n}"
        except OSError as e:  # a working directory this user cannot write into, or a file named runs
            print(f"error: cannot make the run directory {run_dir} here ({e}); run from a folder you can write into",
                  file=sys.stderr)
            sys.exit(2)
    if args.track:
        import wandb

        try:
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity or None, sync_tensorboard=True,
                       config=vars(args), name=os.path.basename(run_dir), save_code=True)
        except Exception as e:  # no login, no network: say so now, and leave nothing behind
            os.rmdir(run_dir)
            print(f"error: --track: wandb could not start ({type(e).__name__}: {e}); run `wandb login`, or set "
                  "WANDB_MODE=offline and upload later with `wandb sync`", file=sys.stderr)
            sys.exit(2)
    env = make_env(args.env_id, os.path.join(run_dir, "videos") if args.capture_video else "")
    writer = SummaryWriter(run_dir)  # the flags are in evaluations.json
    print(f"k={args.me_coef:g} on {args.env_id}, seed {args.seed}: logs in {run_dir}")
    if args.total_timesteps < args.learning_starts:
        print(f"warning: --total-timesteps {args.total_timesteps:,} is below --learning-starts {args.learning_starts:,}: "
              "the network will make no update", file=sys.stderr)
    if args.total_timesteps % args.eval_interval:
        print(f"warning: --total-timesteps is not a multiple of --eval-interval: the last "
              f"{args.total_timesteps % args.eval_interval:,} steps' network is never evaluated", file=sys.stderr)
    torch.set_flush_denormal(True)  # CPU: below 1e-38 is 0. Adam's averages of dead units decay there, 40x slower to compute
    torch.manual_seed(args.seed)  # the network's initial weights
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    rng = np.random.default_rng(args.seed)  # each step: the exploration draws, then the replay draw
    obs_size, n_actions = env.observation_space.shape[0], int(env.action_space.n)
    q_network = QNetwork(obs_size, n_actions, args.me_coef, args.obs_divisor).to(device)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
    target_network = QNetwork(obs_size, n_actions, args.me_coef, args.obs_divisor).to(device)
    target_network.load_state_dict(q_network.state_dict())
    rb = ReplayBuffer(min(args.buffer_size, max(args.total_timesteps, 1)), obs_size)  # never more than the run fills
    evaluations, gap_sum, updates = [], torch.zeros((), device=device), 0  # action gaps, updates since the last eval
    # the authors' statistics: a ring of the last Q_RECORD training Q values, the gaps measured at the syncs since the
    # last evaluation, on min(4 x batch, sync interval - 1) replay states (99 here) drawn from a generator of their own
    q_record, q_recorded, sync_gaps = torch.zeros(Q_RECORD, device=device), 0, []
    gap_rng, gap_states = np.random.default_rng([args.seed, 1]), min(4 * args.batch_size, args.target_network_frequency - 1)

    def record_evaluation(step: int):
        stats = evaluate(q_network, eval_env, args.eval_episodes, args.gamma, args.reward_scale, device)
        stats["action_gap"] = gap_sum.item() / updates if updates else None  # mean over the updates since the last
        stats |= claim_statistics(q_record[:min(q_recorded, Q_RECORD)], sync_gaps)
        sync_gaps.clear()
        evaluations.append({"step": step, **stats})
        for key, value in stats.items():
            if value is not None:
                group = "claims" if key in ("average_q", "average_action_gap", "relative_action_gap") else "eval"
                writer.add_scalar(f"{group}/{key}", value, step)
        print(f"step {step:,}: mean score {stats['mean']:.1f} over {stats['episodes']:.0f} greedy episodes")
        path = os.path.join(run_dir, "evaluations.json")
        with open(path + ".tmp", "w") as f:  # then renamed over the old one: a stop or a full disk mid-write loses no row
            json.dump({"config": {**asdict(args), "n_actions": n_actions}, "evaluations": evaluations}, f, indent=1)
        os.replace(path + ".tmp", path)

    eval_env.reset(seed=2**32 - 1 - args.seed)  # seeds the evaluation games once; later resets continue its RNG
    record_evaluation(0)  # the authors' first point: the untrained network
    obs, _ = env.reset(seed=args.seed)
    start_time = time.time()
    for step in range(1, args.total_timesteps + 1):  # step: agent steps taken, this one included
        epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_steps, step - 1)
        if rng.random() < epsilon:
            action = int(rng.integers(n_actions))
        else:
            with torch.no_grad():
                action = int(q_network(torch.as_tensor(obs, device=device)).argmax())
        next_obs, reward, terminated, truncated, info = env.step(action)
        rb.add(obs, action, reward * args.reward_scale, next_obs, terminated)  # scaled for learning only
        obs = next_obs
        if terminated or truncated:
            writer.add_scalar("charts/episodic_return", info["episode"]["r"], step)
            obs, _ = env.reset()

        # the authors' order within a step: sync the target, then update, then evaluate
        if step % args.target_network_frequency == 0:
            target_network.load_state_dict(q_network.state_dict())
            if 0 < gap_states <= rb.size:
                sync_gaps.append(measure_action_gap(q_network, rb, gap_states, gap_rng, device))
        if step >= args.learning_starts and step % args.train_frequency == 0:
            batch = rb.batch(rng.choice(rb.size, args.batch_size, replace=False), device)
            loss, q = td_loss(q_network, target_network, batch, args.gamma)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            q = q.detach()
            gap = action_gap(q)  # our own per-batch action gap
            gap_sum, updates = gap_sum + gap, updates + 1
            q_taken = q.gather(1, batch[1][:, None]).squeeze(1)[-Q_RECORD:]  # into the ring of the last Q_RECORD
            q_record[(q_recorded + torch.arange(len(q_taken), device=device)) % Q_RECORD] = q_taken
            q_recorded += len(q_taken)
            if step % 100 == 0:
                writer.add_scalar("losses/td_loss", loss.item(), step)
                writer.add_scalar("metrics/action_gap", gap.item(), step)
                writer.add_scalar("charts/SPS", int(step / (time.time() - start_time)), step)
        if step % args.eval_interval == 0:
            record_evaluation(step)
            gap_sum, updates = torch.zeros((), device=device), 0

    if args.save_model:
        torch.save(q_network.state_dict(), os.path.join(run_dir, f"{args.exp_name}.cleanrl_model"))
    for closable in (env, eval_env, writer):
        closable.close()
    return evaluations


if __name__ == "__main__":
    main(tyro.cli(Args))
