"""The authors' LunarLander k sweep (brett-daley/me_layer: plotting/plot_lunar_lander.py), fast enough for a laptop.

    python dqn_meanexp_sweep.py                                  # 14 k x seeds 1-10 into results/lunar_sweep, figures
    python dqn_meanexp_sweep.py --ks 0 4 256 --seeds 1 2 3       # a part: members the folder holds are skipped
    python dqn_meanexp_sweep.py --plot-only --figure-dir docs    # the figures and the table of what the folder holds

Each member (k, seed) is `python dqn_meanexp.py --me-coef k --seed seed`: the same network, environments, seeds,
exploration and replay draws, evaluations and statistics: with --no-compile its results equal that run's (tests/
test_lunar_sweep.py checks); compiled, the float order differs, the runs part ways after some updates, and a member is
another sample of the same experiment, as a run on another machine would be. What differs is how it runs: the
members of one worker process step in lockstep, and their networks are stacked tensors with a leading member
dimension, so one batched matrix product serves them all and one Adam over the stacked parameters is every member's
own Adam (it is element-wise). Each worker uses one core.

Then, as the authors' plot: AUC(k) = the mean over the evaluation points of the across-seed mean score, its 95%
interval 1.96 (norm.ppf(0.975)) x the standard error of the per-seed AUCs, drawn against k on a log axis, k = 0 a line.
"""

import ctypes
import ctypes.util
import dataclasses
import glob
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
import torch

import dqn_meanexp
import longrun  # the lock that keeps one sweep per --out folder
from longrun import machine  # the CPU model a part's record names

AUTHORS_KS = (0, 1, 4, 16, 32, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)  # plot_lunar_lander.py's
CURVE_KS = (0, 16, 32, 256, 2048, 8192, 16384, 32768)  # the k whose score curves its figure draws (params_to_plot)
Z_95 = 1.959963984540054  # the authors' 95% interval: norm.ppf(0.975) standard errors
# flags that change no number of a member (the population never saves, films, tracks or uses CUDA): a part may differ
LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform == "linux" else None  # malloc_trim, prctl
PR_SET_PDEATHSIG = 1  # prctl: the signal a process gets when its parent ends
NOT_RESULTS = ("exp_name", "cuda", "track", "wandb_project_name", "wandb_entity", "capture_video", "save_model")


@dataclass
class SweepArgs:
    out: str = "results/lunar_sweep"
    """the folder of the sweep: one subfolder per member under runs/, a record of each part under parts/"""
    ks: Tuple[float, ...] = AUTHORS_KS
    """the mean-expansion coefficients k (default: the ones the authors plotted)"""
    seeds: Tuple[int, ...] = tuple(range(1, 11))
    """the seeds of each k"""
    workers: int = 2
    """processes, one core each; the members are dealt out between them"""
    compile: bool = True
    """compile the batched update with torch.compile (the same math in the compiler's float order: 1.3-1.7x faster on
    CPU, 30 s to compile; a member is then another sample of its single run's experiment, not that run);
    --no-compile: each member equals its single run to the bit"""
    plot_only: bool = False
    """train nothing: draw the figures and the table from what the folder holds"""
    figure_dir: Optional[str] = None
    """where the figures and lunar_table.md go (default: the sweep's folder)"""
    dqn: dqn_meanexp.Args = field(default_factory=dqn_meanexp.Args)
    """dqn_meanexp.py's flags for every member (--dqn.total-timesteps ...); each member sets its own k and seed"""


# ==== The population: every member's network as one stacked tensor per layer ====


def stack_networks(networks: list) -> list:
    """[W1, b1, W2, b2, W3, b3] of the members' QNetworks: weights (M, in, out), so x @ W is nn.Linear's x W^T + b."""
    params = []
    for i in (0, 2, 4):  # the three nn.Linear layers of QNetwork.network
        layers = [net.network[i] for net in networks]
        params += [torch.stack([layer.weight.detach().T for layer in layers]).contiguous(),
                   torch.stack([layer.bias.detach() for layer in layers])[:, None, :].contiguous()]
    return params


def forward(params: list, obs: torch.Tensor, k: torch.Tensor, obs_divisor: float) -> tuple:
    """QNetwork.forward for all members: obs (M, B, obs_size) -> Q (M, B, |A|), and the activations backward needs."""
    w1, b1, w2, b2, w3, b3 = params
    x = obs / obs_divisor
    h1 = torch.relu(torch.baddbmm(b1, x, w1))  # b1 + x @ w1, member by member: nn.Linear's numbers, to the bit
    h2 = torch.relu(torch.baddbmm(b2, h1, w2))
    return dqn_meanexp.mean_expansion(torch.baddbmm(b3, h2, w3), k), (x, h1, h2)  # k: (M, 1, 1), each member its own


def member_gradients(params: list, target: list, k: torch.Tensor, obs_divisor: float, gamma: float, batch: tuple) -> tuple:
    """One member's gradient of dqn_meanexp.td_loss itself, its networks being the population's forward for that member
    (torch.func.grad), with its action gap and the Q of its batch's taken actions. `gradients` maps it over the members."""
    def network(p: list):
        return lambda x: forward([t[None] for t in p], x[None], k[None], obs_divisor)[0][0]

    grads, q = torch.func.grad(lambda p: dqn_meanexp.td_loss(network(p), network(target), batch, gamma), has_aux=True)(params)
    return grads, dqn_meanexp.action_gap(q), q.gather(1, batch[1][:, None]).squeeze(1)


# every member's gradients at once, each the one its single run's autograd computes (tests/test_lunar_sweep.py): vmap
# turns each product into one batched product over the members (issue 32: at most 1% slower than the chain rule written out
# by hand, which this replaced, benchmarks/sweep_gradients.py; a copy of td_loss's derivative is no longer kept here)
gradients = torch.func.vmap(member_gradients, in_dims=(0, 0, 0, None, None, 0))


class Population:
    """Members (k, seed) of one worker, each as dqn_meanexp.main would build it: network, optimizer, envs, RNG."""

    def __init__(self, args: dqn_meanexp.Args, members: list, compile: bool):
        self.args, self.members = args, members
        torch.set_flush_denormal(True)  # as dqn_meanexp.main: below 1e-38 is 0 (else Adam slows down 40x)
        self.envs = [dqn_meanexp.make_env(args.env_id) for _ in members]
        self.eval_envs = [dqn_meanexp.make_env(args.env_id) for _ in members]
        self.obs_size, self.n_actions = self.envs[0].observation_space.shape[0], int(self.envs[0].action_space.n)
        networks = []
        for k, seed in members:
            torch.manual_seed(seed)  # as dqn_meanexp.main: the network's initial weights
            networks.append(dqn_meanexp.QNetwork(self.obs_size, self.n_actions, k, args.obs_divisor))
        self.params = stack_networks(networks)  # plain tensors: gradients() differentiates the loss functionally
        self.target = [p.clone() for p in self.params]
        # Adam is element-wise: one Adam over the stacks is every member's own. Its vectorized kernel rounds the last
        # few elements of a tensor (fewer than a vector) another way, so the output biases (|A| numbers a member) go
        # in as each member's own tensor; every other stack is whole vectors a member: rounding as in single runs.
        self.optimizer = torch.optim.Adam(self.params[:5] + list(self.params[5]), lr=args.learning_rate,
                                          eps=args.adam_eps, fused=True)
        self.k = torch.tensor([float(k) for k, _ in members])[:, None, None]
        self.rngs = [np.random.default_rng(seed) for _, seed in members]  # as dqn_meanexp.main: exploration, replay
        self.gap_rngs = [np.random.default_rng([seed, 1]) for _, seed in members]  # as dqn_meanexp.main: the statistic's
        self.gradients = torch.compile(gradients, dynamic=False) if compile else gradients
        capacity, m = min(args.buffer_size, max(args.total_timesteps, 1)), len(members)
        # every member's replay in one tensor, so that one gather draws all the batches: member i's ring is rows
        # i * capacity onward, a row is obs, next_obs, action, reward, terminated (float32 holds the actions exactly)
        self.replay = torch.zeros(m * capacity, 2 * self.obs_size + 3)
        self.ring_starts = torch.arange(m)[:, None] * capacity
        self.capacity, self.pos, self.size = capacity, 0, 0

    @torch.inference_mode()  # no autograd bookkeeping at all: 20% off a forward at batch 1
    def q_values(self, obs: np.ndarray) -> torch.Tensor:
        """Q(s, .) of one observation per member: obs (M, obs_size) -> (M, |A|)."""
        return forward(self.params, torch.as_tensor(obs)[:, None], self.k, self.args.obs_divisor)[0][:, 0]

    def add(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray, terminated: np.ndarray):
        """One transition per member (arrays with a leading member dimension), at the same ring position for all."""
        rows = np.concatenate([obs, next_obs, actions[:, None], rewards[:, None], terminated[:, None]], axis=1)
        self.replay[self.ring_starts[:, 0] + self.pos] = torch.as_tensor(rows, dtype=torch.float32)
        self.pos, self.size = (self.pos + 1) % self.capacity, min(self.size + 1, self.capacity)

    @torch.inference_mode()
    def action_gaps(self, n_states: int) -> np.ndarray:
        """dqn_meanexp.measure_action_gap for every member: n_states replay states each, from its own gap generator."""
        indices = np.stack([rng.choice(self.size, n_states, replace=False) for rng in self.gap_rngs])
        rows = self.replay.index_select(0, (torch.as_tensor(indices) + self.ring_starts).view(-1))
        states = rows.view(len(self.members), n_states, -1)[..., :self.obs_size]
        return dqn_meanexp.action_gap(forward(self.params, states, self.k, self.args.obs_divisor)[0]).numpy()

    def update(self) -> tuple:
        """One update of every member on its own batch (drawn as dqn_meanexp.main draws it); returns the action gaps and
        the Q of the batches' taken actions (M, batch)."""
        indices = np.stack([rng.choice(self.size, self.args.batch_size, replace=False) for rng in self.rngs])
        rows = self.replay.index_select(0, (torch.as_tensor(indices) + self.ring_starts).view(-1))
        rows, o = rows.view(len(self.members), self.args.batch_size, -1), self.obs_size
        batch = (rows[..., :o], rows[..., 2 * o].long(), rows[..., 2 * o + 1], rows[..., o:2 * o], rows[..., 2 * o + 2])
        grads, gaps, q_taken = self.gradients(self.params, self.target, self.k, self.args.obs_divisor, self.args.gamma, batch)
        for param, grad in zip(self.optimizer.param_groups[0]["params"], grads[:5] + list(grads[5])):
            param.grad = grad
        self.optimizer.step()
        return gaps, q_taken

    def sync_target(self):
        for t, p in zip(self.target, self.params):
            t.copy_(p)


def evaluate(pop: Population) -> list:
    """dqn_meanexp.evaluate for every member, the members' games in lockstep (one batched forward per step)."""
    args, m = pop.args, len(pop.members)
    finished = [[] for _ in range(m)]
    q_taken, rewards = [[] for _ in range(m)], [[] for _ in range(m)]
    obs = np.stack([env.reset()[0] for env in pop.eval_envs])
    playing = list(range(m))
    while playing:
        q = pop.q_values(obs).numpy()
        ended = []
        for i in playing:
            action = int(q[i].argmax())
            q_taken[i].append(float(q[i, action]))
            obs[i], reward, terminated, truncated, _ = pop.eval_envs[i].step(action)
            rewards[i].append(float(reward))
            if terminated or truncated:
                ended.append((i, truncated))
        bootstraps = pop.q_values(obs).numpy().max(axis=1) if any(truncated for _, truncated in ended) else None
        for i, truncated in ended:
            bootstrap = float(bootstraps[i]) if truncated else 0.0  # as the authors: a cut episode bootstraps
            stats = dqn_meanexp.episode_statistics(q_taken[i], rewards[i], args.gamma, args.reward_scale, bootstrap)
            finished[i].append({**stats, "truncated": truncated})
            q_taken[i], rewards[i] = [], []
            if len(finished[i]) < args.eval_episodes:
                obs[i] = pop.eval_envs[i].reset()[0]
            else:
                playing.remove(i)
    return [dqn_meanexp.summarize(episodes) for episodes in finished]


def release_freed_memory():
    """Hands the heap's freed pages back to the system. The compiled update's temporaries leave glibc's heap so
    fragmented that a worker of 35 members grew by GBs a minute, all of it freed memory; this keeps it flat."""
    if LIBC is not None and hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)


def train(pop: Population) -> tuple:
    """dqn_meanexp.main's loop for every member at once. Returns (each member's evaluations, seconds per phase)."""
    args, m = pop.args, len(pop.members)
    clock = dict.fromkeys(("act", "env", "update", "evaluate"), 0.0)
    evaluations, gap_sum, updates = [[] for _ in range(m)], torch.zeros(m), 0  # action gaps, updates since the last eval
    # the authors' statistics, as dqn_meanexp.main keeps them, one row per member
    q_record, q_recorded, sync_gaps = torch.zeros(m, dqn_meanexp.Q_RECORD), 0, [[] for _ in range(m)]
    gap_states = min(4 * args.batch_size, args.target_network_frequency - 1)

    def record_evaluation(step: int):
        started = time.perf_counter()
        recent = q_record[:, :min(q_recorded, dqn_meanexp.Q_RECORD)]
        for i, stats in enumerate(evaluate(pop)):
            evaluations[i].append({"step": step, **stats, "action_gap": float(gap_sum[i]) / updates if updates else None,
                                   **dqn_meanexp.claim_statistics(recent[i], sync_gaps[i])})
            sync_gaps[i] = []
        clock["evaluate"] += time.perf_counter() - started
        scores = [rows[-1]["mean"] for rows in evaluations]
        print(f"worker {os.getpid()}: step {step:,}/{args.total_timesteps:,} of {m} members after "
              f"{sum(clock.values()) / 60:.1f} min; mean scores {min(scores):.0f} to {max(scores):.0f}", flush=True)

    for env, (_, seed) in zip(pop.eval_envs, pop.members):
        env.reset(seed=2**32 - 1 - seed)
    record_evaluation(0)
    obs = np.stack([env.reset(seed=seed)[0] for env, (_, seed) in zip(pop.envs, pop.members)])
    for step in range(1, args.total_timesteps + 1):
        started = time.perf_counter()
        epsilon = dqn_meanexp.linear_schedule(args.start_e, args.end_e, args.exploration_steps, step - 1)
        explore = [rng.random() < epsilon for rng in pop.rngs]
        actions = np.array([rng.integers(pop.n_actions) if e else -1 for rng, e in zip(pop.rngs, explore)])
        if not all(explore):
            actions = np.where(explore, actions, pop.q_values(obs).argmax(dim=1).numpy())
        clock["act"] += time.perf_counter() - started

        started = time.perf_counter()
        next_obs, rewards, terminated = np.empty_like(obs), np.zeros(m, np.float32), np.zeros(m, np.float32)
        ended = []
        for i, env in enumerate(pop.envs):
            next_obs[i], reward, terminated[i], truncated, _ = env.step(int(actions[i]))
            rewards[i] = reward * args.reward_scale  # scaled for learning only, as dqn_meanexp
            if terminated[i] or truncated:
                ended.append(i)
        pop.add(obs, actions, rewards, next_obs, terminated)
        obs = next_obs
        for i in ended:
            obs[i] = pop.envs[i].reset()[0]
        clock["env"] += time.perf_counter() - started

        started = time.perf_counter()  # the authors' order within a step: sync the target, then update, then evaluate
        if step % args.target_network_frequency == 0:
            pop.sync_target()
            release_freed_memory()
            if 0 < gap_states <= pop.size:
                for i, gap in enumerate(pop.action_gaps(gap_states)):
                    sync_gaps[i].append(float(gap))
        if step >= args.learning_starts and step % args.train_frequency == 0:
            gaps, q_taken = pop.update()
            gap_sum += gaps
            updates += 1
            q_taken = q_taken[:, -dqn_meanexp.Q_RECORD:]
            q_record[:, (q_recorded + torch.arange(q_taken.shape[1])) % dqn_meanexp.Q_RECORD] = q_taken
            q_recorded += q_taken.shape[1]
        clock["update"] += time.perf_counter() - started
        if step % args.eval_interval == 0:
            record_evaluation(step)
            gap_sum, updates = torch.zeros(m), 0
    return evaluations, clock


# ==== Running the sweep in parts: workers, the results folder, the record of each part ====


def member_dir(out: str, k: float, seed: int) -> str:
    return os.path.join(out, "runs", f"k{k:g}__seed{seed}")


def member_config(args: dqn_meanexp.Args, k: float, seed: int, n_actions: int) -> dict:
    """What evaluations.json records of a member: its dqn_meanexp flags, as a single run records them."""
    return {**dataclasses.asdict(dataclasses.replace(args, me_coef=float(k), seed=seed)), "n_actions": n_actions}


def write_json(path: str, data: dict):
    """Writes all or nothing: a stopped sweep never leaves half a file that looks finished."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def train_members(args: SweepArgs, members: list, parent: int) -> dict:
    """One worker: trains its members as one population on one core, writes each member's evaluations.json."""
    if LIBC is not None:  # Linux: this worker gets SIGTERM when the sweep's main process ends, however it ends
        LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the main process ended before that was set
        sys.exit(1)
    torch.set_num_threads(1)
    started = time.perf_counter()
    pop = Population(args.dqn, members, args.compile)
    evaluations, clock = train(pop)
    for (k, seed), rows in zip(members, evaluations):
        write_json(os.path.join(member_dir(args.out, k, seed), "evaluations.json"),
                   {"config": member_config(args.dqn, k, seed, pop.n_actions), "evaluations": rows})
    a = args.dqn  # updates come at the steps >= learning_starts that are multiples of train_frequency
    updates = max(0, a.total_timesteps // a.train_frequency - (max(a.learning_starts, 1) - 1) // a.train_frequency)
    return {"members": len(members), "updates_per_member": updates, "seconds": time.perf_counter() - started,
            "phases": clock, "obs_size": pop.obs_size, "n_actions": pop.n_actions}


def gemm_gflops(n: int = 2048, repeats: int = 10) -> float:
    """The machine's matrix-multiply rate, for a part's floor: the best of `repeats` n x n float32 products (2 n^3 FLOP
    each) on all of torch's threads, after one to warm up (`python benchmarks/gemm.py` prints it)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def code_version() -> Optional[str]:
    """The commit the part ran (with " + changes" where the tree differed from it), for its record; None outside git."""
    def git(*words):
        return subprocess.run(["git", *words], capture_output=True, text=True, cwd=os.path.dirname(__file__) or ".")
    commit = git("rev-parse", "HEAD")
    if commit.returncode:
        return None
    return commit.stdout.strip() + (" + changes" if git("status", "--porcelain", "--untracked-files=no").stdout else "")


def update_flop(obs_size: int, n_actions: int, batch_size: int, hidden: int = 256) -> int:
    """FLOP of one update of one member as the floor counts them: the online network's forward and backward passes
    (3 x 2 x batch x weights; the target's forward, the head and Adam are left out)."""
    return 3 * 2 * batch_size * (obs_size * hidden + hidden * hidden + hidden * n_actions)


def run_part(args: SweepArgs) -> Optional[dict]:
    """Trains the members the folder does not hold yet, in args.workers processes, and records the part."""
    todo = [(k, seed) for k in args.ks for seed in args.seeds
            if not os.path.exists(os.path.join(member_dir(args.out, k, seed), "evaluations.json"))]
    config_errors = []  # every member the folder holds, of any k and seed, must share these flags
    for path in sorted(glob.glob(os.path.join(args.out, "runs", "*", "evaluations.json"))):
        try:
            with open(path) as f:
                held = json.load(f)["config"]
            wanted = member_config(args.dqn, held["me_coef"], held["seed"], held["n_actions"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            config_errors.append(f"{path} cannot be read ({type(e).__name__}: {e})")
            continue
        differ = sorted(n for n in {*held, *wanted} - set(NOT_RESULTS) if held.get(n) != wanted.get(n))
        if differ:
            config_errors.append(f"{path} was trained with other flags than these: "
                                 + ", ".join(f"--dqn.{n.replace('_', '-')} {held.get(n)} (here {wanted.get(n)})"
                                             for n in differ))
    if config_errors:
        print("\n".join(f"error: {e}" for e in config_errors) + "\n(one folder per setting: choose another --out)",
              file=sys.stderr)
        sys.exit(2)
    if not todo:
        print(f"{args.out} holds every member already")
        return None
    workers = min(args.workers, len(todo))
    print(f"training {len(todo)} members in {workers} worker(s) into {args.out}; measuring the GEMM rate first")
    gemm_before = gemm_gflops()
    # glibc's malloc raises its mmap threshold to each freed block's size, then serves the updates' temporaries from a
    # heap that grows without bound (3-5 MB an update at 35 members); a fixed threshold keeps it flat, and is faster
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(32 * 2**20))  # read by the spawned workers' malloc at start
    started = time.time()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(train_members, [args] * workers, [todo[w::workers] for w in range(workers)],
                                [os.getpid()] * workers))
    wall = time.time() - started
    gemm_after = gemm_gflops()
    flop = sum(r["members"] * r["updates_per_member"] for r in results) * update_flop(
        results[0]["obs_size"], results[0]["n_actions"], args.dqn.batch_size)
    floor = flop / (max(gemm_before, gemm_after) * 1e9)  # the faster GEMM measurement: the stricter floor
    if not flop:  # the members never learned (--dqn.total-timesteps below --dqn.learning-starts): no floor to set against
        print(f"warning: {len(todo)} members made no update (--dqn.total-timesteps {args.dqn.total_timesteps:,} is below "
              f"--dqn.learning-starts {args.dqn.learning_starts:,}): their scores are the untrained networks'",
              file=sys.stderr)
    record = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv), "code": code_version(),
              "members": todo,
              "machine": machine(), "workers": workers,
              "torch": torch.__version__, "compile": args.compile, "wall_seconds": wall, "flop": flop,
              "gemm_gflops_before": gemm_before, "gemm_gflops_after": gemm_after, "floor_seconds": floor,
              "ratio_to_floor": wall / floor if floor else None, "workers_detail": results}
    write_json(os.path.join(args.out, "parts", time.strftime("%Y%m%d-%H%M%S") + ".json"), record)
    print(f"{len(todo)} members in {wall / 60:.1f} min; the GEMM floor of their updates {floor / 60:.1f} min "
          f"(at {max(gemm_before, gemm_after):.0f} GFLOP/s)" + (f": {wall / floor:.2f}x" if floor else ""))
    return record


# ==== The figures and the table, as the authors compute them ====


def load_sweep(folder: str) -> dict:
    """{k: {seed: evaluation rows}} of every evaluations.json under folder (a sweep's, or single runs' runs/)."""
    sweep, steps, settings, errors = {}, {}, {}, []
    for path in sorted(glob.glob(os.path.join(folder, "**", "evaluations.json"), recursive=True)):
        try:
            with open(path) as f:
                data = json.load(f)
            config, rows = data["config"], data["evaluations"]
            config["seed"], config["me_coef"], [row["mean"] for row in rows]  # noqa: B018 (what the figures read)
        except (OSError, ValueError, KeyError, TypeError) as e:
            errors.append(f"{path} cannot be read ({type(e).__name__}: {e}): move it away, or train that member again")
            continue
        if config["seed"] in sweep.get(config["me_coef"], {}):
            errors.append(f"{path}: k = {config['me_coef']:g}, seed {config['seed']} twice")
        sweep.setdefault(config["me_coef"], {})[config["seed"]] = rows
        steps[path] = [row["step"] for row in rows]
        settings[path] = {n: v for n, v in config.items() if n not in (*NOT_RESULTS, "me_coef", "seed")}
    if len({json.dumps(s, sort_keys=True) for s in settings.values()}) > 1:  # the same experiment but for k and seed
        errors.append(f"the runs under {folder} were trained with different flags (besides k and seed)")
    if errors:
        sys.exit("error: " + "; ".join(errors))
    if len({tuple(s) for s in steps.values()}) > 1:  # the AUC averages over the points: they must be the same
        sys.exit(f"error: the runs under {folder} were evaluated at different steps: " +
                 "; ".join(f"{path}: {s[-1] if s else 'none'} last" for path, s in steps.items()))
    if not sweep:
        sys.exit(f"error: no evaluations.json under {folder}")
    return dict(sorted(sweep.items()))


def whole_run(runs: dict, key: str) -> float:
    """Claims 2 and 3 as the authors' plotting/two_alg_aux.py: per seed, the mean of a statistic over all the run's
    evaluation rows that have it (NaN rows dropped); then the mean over seeds. NaN where no row has it (older runs)."""
    per_seed = [np.mean(v) for v in ([row[key] for row in rows if row.get(key) is not None] for rows in runs.values()) if v]
    return float(np.mean(per_seed)) if per_seed else float("nan")


def summarize_k(runs: dict) -> dict:
    """One k: AUC = the mean over the evaluation points of the across-seed mean score; its 95% interval 1.96 x the
    standard error of the per-seed AUCs (none with one seed); the last point's means of the other statistics; the
    whole-run relative action gap and overestimation (whole_run)."""
    curves = np.array([[row["mean"] for row in rows] for rows in runs.values()])  # (seeds, points)
    seed_aucs = curves.mean(axis=1)
    last = [rows[-1] for rows in runs.values()]
    gaps = [row["action_gap"] for row in last if row["action_gap"] is not None]
    return {"seeds": len(runs), "auc": float(curves.mean(axis=0).mean()),
            "ci": float(Z_95 * seed_aucs.std(ddof=1) / np.sqrt(len(runs))) if len(runs) > 1 else float("nan"),
            "final_score": float(curves[:, -1].mean()),
            "final_overestimation": float(np.mean([row["overestimation"] for row in last])),
            "final_normalized_overestimation": float(np.mean([row["normalized_overestimation"] for row in last])),
            "final_action_gap": float(np.mean(gaps)) if gaps else float("nan"),
            "relative_action_gap": whole_run(runs, "relative_action_gap"), "overestimation": whole_run(runs, "overestimation")}


def against_dqn(table: dict) -> dict:
    """Each k's change against k = 0, as the authors' figures: relative action gap increase = k's - DQN's; % decrease
    in overestimation = -(k's - DQN's) / (|DQN's| + 1e-8) x 100. NaN without a k = 0 row."""
    base = table.get(0.0, {"relative_action_gap": float("nan"), "overestimation": float("nan")})
    for row in table.values():
        row["relative_action_gap_increase"] = row["relative_action_gap"] - base["relative_action_gap"]
        row["overestimation_decrease_pct"] = -(row["overestimation"] - base["overestimation"]) / (
            abs(base["overestimation"]) + 1e-8) * 100
    return table


def markdown_table(table: dict) -> str:
    def cell(value: float, form: str) -> str:  # NaN: not measured (one seed has no interval; older runs no claims)
        return "n/a" if np.isnan(value) else format(value, form)

    lines = ["| k | seeds | AUC of score | 95% interval | final score | final overestimation | final normalized "
             "overestimation | final action gap | whole-run relative action gap | its increase over k = 0 | whole-run "
             "overestimation | its decrease from k = 0 (%) |", "|" + " --- |" * 12]
    for k, r in table.items():
        ci = "none" if np.isnan(r["ci"]) else f"± {r['ci']:.1f}"
        lines.append(f"| {k:g} | {r['seeds']} | {r['auc']:.1f} | {ci} | {r['final_score']:.1f} | "
                     f"{r['final_overestimation']:.3f} | {r['final_normalized_overestimation']:.3f} | "
                     f"{cell(r['final_action_gap'], '.4f')} | {cell(r['relative_action_gap'], '.4f')} | "
                     f"{cell(r['relative_action_gap_increase'], '+.4f')} | {cell(r['overestimation'], '.3f')} | "
                     f"{cell(r['overestimation_decrease_pct'] + 0.0, '.1f')} |")
    return "\n".join(lines) + "\n"


def plot(folder: str, figure_dir: str) -> dict:
    """Writes lunar_k_auc.png, lunar_curves.png, lunar_overestimation_gap.png and lunar_table.md into figure_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = load_sweep(folder)
    table = against_dqn({k: summarize_k(runs) for k, runs in sweep.items()})
    os.makedirs(figure_dir, exist_ok=True)
    ks = [k for k in table if k > 0]

    def against_k(ax, key: str, label: str, band: Optional[str] = None):
        """A statistic against k > 0 on a log axis, k = 0 as a dotted line (with its band where there is one)."""
        values = np.array([table[k][key] for k in ks])
        if np.isnan(values).all():  # a sweep trained before the statistic existed
            ax.text(0.5, 0.5, "not recorded by these runs", ha="center", va="center", transform=ax.transAxes)
            ax.set(xlabel="mean-scaling coefficient k", ylabel=label)
            return
        ax.plot(ks, values, marker="o", label="mean-expansion (k > 0)")
        if band:
            err = np.array([table[k][band] for k in ks])
            ax.fill_between(ks, values - err, values + err, alpha=0.2)
        if 0 in table:
            ax.axhline(table[0][key], color="black", linestyle=":", label="DQN (k = 0)")
            if band:
                ax.axhspan(table[0][key] - table[0][band], table[0][key] + table[0][band], color="gray", alpha=0.15)
        ax.set(xscale="log" if ks else "linear", xlabel="mean-scaling coefficient k", ylabel=label)
        ax.legend(frameon=False)

    fig, ax = plt.subplots(figsize=(6, 4))
    against_k(ax, "auc", "AUC of score (mean over evaluations)", band="ci")
    ax.set_title(f"LunarLander-v3: AUC against k ({max(r['seeds'] for r in table.values())} seeds, 95% intervals)")
    fig.tight_layout()
    fig.savefig(os.path.join(figure_dir, "lunar_k_auc.png"), dpi=120)

    fig, ax = plt.subplots(figsize=(6, 4))
    for k in [k for k in CURVE_KS if k in sweep] or list(sweep)[:8]:  # the authors' choice
        curves = np.array([[row["mean"] for row in rows] for rows in sweep[k].values()])
        steps = [row["step"] for row in next(iter(sweep[k].values()))]
        mean = curves.mean(axis=0)
        err = Z_95 * curves.std(axis=0, ddof=1) / np.sqrt(len(curves)) if len(curves) > 1 else 0 * mean
        ax.plot(steps, mean, label=f"k = {k:g}")
        ax.fill_between(steps, mean - err, mean + err, alpha=0.15)
    ax.set(xlabel="agent steps", ylabel="mean score of 100 greedy episodes", title="LunarLander-v3: score (95% intervals)")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(os.path.join(figure_dir, "lunar_curves.png"), dpi=120)

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, key, label in zip(axes[0], ("relative_action_gap", "overestimation", "overestimation_decrease_pct"),
                              ("whole-run relative action gap", "whole-run overestimation (mean Q - G)",
                               "% decrease in overestimation from k = 0")):
        against_k(ax, key, label)
    for ax, key, label in zip(axes[1], ("final_overestimation", "final_normalized_overestimation", "final_action_gap"),
                              ("overestimation (mean Q - G)", "normalized overestimation", "action gap (every batch)")):
        against_k(ax, key, f"final {label}")
    fig.suptitle("LunarLander-v3: claims 2 and 3 as the authors compute them (top: means over every evaluation of a "
                 "run, then over seeds) and at the last evaluation (bottom)")
    fig.tight_layout()
    fig.savefig(os.path.join(figure_dir, "lunar_overestimation_gap.png"), dpi=120)
    plt.close("all")

    with open(os.path.join(figure_dir, "lunar_table.md"), "w") as f:
        f.write(markdown_table(table))
    print(markdown_table(table))
    return table


def main(args: SweepArgs):
    errors = [f"--ks: k must be a finite number >= 0, got {k:g}" for k in args.ks if not 0 <= k < float("inf")]
    names = [os.path.basename(member_dir("", k, 1)) for k in args.ks]
    errors += [f"--ks {a:.12g} and {b:.12g} would share one folder ({n}): give values that differ in 6 significant digits"
               for i, (a, n) in enumerate(zip(args.ks, names))
               for b, m in zip(args.ks[i + 1:], names[i + 1:]) if n == m and a != b]
    errors += [f"--seeds: a seed must be in [0, 2^32 - 2], got {s}" for s in args.seeds if not 0 <= s < 2**32 - 1]
    errors += ["--ks and --seeds must each list at least one value, without repeats"] * (
        not args.ks or not args.seeds or len(set(args.ks)) < len(args.ks) or len(set(args.seeds)) < len(args.seeds))
    errors += [f"--workers must be at least 1, got {args.workers}"] * (args.workers < 1)
    there = args.out  # found now, not after hours of training: an --out that cannot hold the sweep
    while there and not os.path.exists(there):
        there = os.path.dirname(there)
    if os.path.exists(there or ".") and not (os.path.isdir(there or ".") and os.access(there or ".", os.W_OK | os.X_OK)):
        errors.append(f"--out {args.out!r}: {there or '.'} is not a folder this user can write into")
    if not args.plot_only:
        try:
            dqn_meanexp.make_env(args.dqn.env_id).close()
        except (ValueError, dqn_meanexp.gym.error.Error) as e:
            errors.append(f"--dqn.env-id {args.dqn.env_id}: {e}")
    errors += [f"--dqn.{name.replace('_', '-')} is set for each member by --{flag} (got {getattr(args.dqn, name)})"
               for name, flag in (("seed", "seeds"), ("me_coef", "ks"))
               if getattr(args.dqn, name) != getattr(dqn_meanexp.Args(), name)]
    dqn_meanexp.check_args(args.dqn, errors, flag_prefix="--dqn.")  # exits with code 2 naming every error
    if not args.plot_only:
        os.makedirs(args.out, exist_ok=True)  # one sweep per folder, as one Atari run per run directory: a lock on it
        lock = longrun.lock_run_dir(args.out, advice="Wait for it to end, or choose another --out")
        longrun.name_holder(lock)
        run_part(args)
        lock.close()
    return plot(args.out, args.figure_dir or args.out)


if __name__ == "__main__":
    import tyro

    main(tyro.cli(SweepArgs))
