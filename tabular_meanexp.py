"""The paper's tabular experiment: Q-learning with the mean-expansion update on a 5x5 gridworld.

    python tabular_meanexp.py                       # the full sweep (9 k x 61 step sizes x 128 runs x 5,000 steps)
    python tabular_meanexp.py --runs 16 --steps 1000 --horizons 500 1000   # a quick look

The mean-expansion layer in tabular form keeps residuals R[s, :] and reads Q[s, :] = R[s, :] + k * mean(R[s, :]).
A TD error delta on (s, a) moves every action of s:

    R[s, b] += alpha * delta * ([a == b] + k / |A|)

so Q(s, a) moves by alpha * delta * (1 + k) and the other actions' Q by alpha * delta * k: the update shares value
across the actions of a state. k = 0 is plain Q-learning. The question the experiment asks: with value sharing,
does the agent reach the goal more often early on? For every k, the step size is tuned (the best of 61, per
horizon), and the figure plots the % increase in completed episodes over k = 0.

Everything is vectorized over runs, step sizes and k: one NumPy step advances all 70,272 agents of the sweep
at once, so the full sweep takes about 3 minutes on 2 cores instead of the hours of a Python loop per agent.

How to read this script: Args -> the gridworld -> value iteration -> the agents (acting, the residual update) ->
the sweep -> statistics -> figures and results -> main.
"""

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

import numpy as np
import tyro

# The authors' sweep: k, and step sizes exp(x) for x = -6, -5.9, ..., 0 rounded to 4 decimals as in their script.
PAPER_COEFS = (0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8)
STEP_SIZES = tuple(round(math.exp(x / 10), 4) for x in range(-60, 1))


@dataclass
class Args:
    runs: int = 128
    """independent runs per (k, step size)"""
    steps: int = 5000
    """agent steps per run (episodes restart at the start state; a run is a fixed number of steps)"""
    seed: int = 1
    """seed of the random draws; run i of every (k, step size) uses the same draws (common random numbers)"""
    out: str = "runs/tabular"
    """directory for tabular_results.json and the two figures (must not hold results already)"""
    me_coefs: tuple[float, ...] = PAPER_COEFS
    """the mean-expansion coefficients k to sweep (must include 0, the baseline)"""
    horizons: tuple[int, ...] = (500, 1000, 2500, 5000)
    """steps at which completed episodes are counted (each at most --steps)"""
    noise: Literal["direction", "action"] = "direction"
    """how --noise-prob acts. direction (the assumed reading of the paper): the move goes in a uniformly random
    direction, and the agent updates the action it chose. action: the agent's action is replaced by a uniformly
    random one before it is taken, and the agent updates the action actually taken (more exploration, no noise)"""
    noise_prob: float = 0.25
    """probability of the noise on each step (the paper's runs: 0.25)"""
    epsilon: float = 0.1
    """epsilon of the epsilon-greedy policy (ties between greedy actions broken at random)"""
    gamma: float = 0.95
    """discount factor"""
    value_error_interval: int = 50
    """steps between two measurements of || max_a Q(s, a) - V*(s) ||, as the authors' script measures it"""
    value_error_coefs: Optional[tuple[float, ...]] = None
    """the k plotted in the value-error figure, each at its best step size for the last horizon (default: those of
    0, 0.8, 3.2 and 12.8 that are swept, or every swept k where none of the last three is)"""
    step_sizes: tuple[float, ...] = field(default=STEP_SIZES)
    """the constant step sizes alpha to sweep (default the paper's 61, exp(-6) ... exp(0))"""

    def __post_init__(self):
        if self.value_error_coefs is None:
            shown = tuple(k for k in (0.0, 0.8, 3.2, 12.8) if k in self.me_coefs)
            self.value_error_coefs = shown if len(shown) > 1 else tuple(self.me_coefs)


def check_args(args: Args) -> list:
    """Every problem with the flags, as messages (empty when the run may start)."""
    errors = []
    for name in ("runs", "steps", "value_error_interval"):
        if getattr(args, name) <= 0:
            errors.append(f"--{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})")
    if any(not (0.0 <= k < math.inf) for k in args.me_coefs):
        errors.append(f"--me-coefs must be finite numbers >= 0 (got {list(args.me_coefs)})")
    if 0.0 not in args.me_coefs:
        errors.append(f"--me-coefs must include 0, the plain Q-learning baseline (got {list(args.me_coefs)})")
    if len(set(args.me_coefs)) != len(args.me_coefs):
        errors.append(f"--me-coefs must not repeat a value (got {list(args.me_coefs)})")
    if not set(args.value_error_coefs) <= set(args.me_coefs):
        errors.append(f"--value-error-coefs {list(args.value_error_coefs)} must be among --me-coefs {list(args.me_coefs)}")
    if not args.step_sizes or any(not (0.0 < a <= 1.0) for a in args.step_sizes):
        errors.append(f"--step-sizes must be in (0, 1] (got {list(args.step_sizes)})")
    if not args.horizons or any(not (0 < h <= args.steps) for h in args.horizons):
        errors.append(f"--horizons must be in [1, --steps = {args.steps}] (got {list(args.horizons)})")
    if len(set(args.horizons)) != len(args.horizons):
        errors.append(f"--horizons must not repeat a value (got {list(args.horizons)})")
    if args.value_error_interval > args.steps > 0:  # the value error would be measured once, at step 0 only
        errors.append(f"--value-error-interval {args.value_error_interval} is longer than --steps {args.steps}: "
                      "the value error would be measured before the first step only")
    if not 0 <= args.seed < 2**63:  # NumPy's generator takes a seed >= 0
        errors.append(f"--seed must be in [0, 2^63) (got {args.seed})")
    for name in ("noise_prob", "epsilon"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            errors.append(f"--{name.replace('_', '-')} must be a probability in [0, 1] (got {getattr(args, name)})")
    if not 0.0 <= args.gamma < 1.0:
        errors.append(f"--gamma must be in [0, 1) (got {args.gamma})")
    return errors


# ---------------------------------------------------------------------------
# The gridworld (the authors' table-rl ControlGridworldEnv, 5x5)
# ---------------------------------------------------------------------------
# States 0 .. width*height - 1, row by row; start at 0, the goal is the last state and ends the episode.
# Actions up (+width), down (-width), left (-1), right (+1); a move off the grid stays put.
# Reward -1 per step, GOAL_REWARD on entering the goal.
GOAL_REWARD = 5.0
N_ACTIONS = 4


def gridworld_moves(width: int = 5, height: int = 5) -> np.ndarray:
    """next_state[s, direction] of the deterministic moves."""
    s = np.arange(width * height)
    up = np.where(s + width < width * height, s + width, s)
    down = np.where(s - width >= 0, s - width, s)
    left = np.where(s % width != 0, s - 1, s)
    right = np.where(s % width != width - 1, s + 1, s)
    return np.stack([up, down, left, right], axis=1)


def transition_matrix(moves: np.ndarray, noise: str, noise_prob: float) -> np.ndarray:
    """P[s, a, s'] of the MDP the agent learns about. Under --noise direction the chosen action's move happens
    with probability 1 - p + p/4 and each other move with p/4; under --noise action the agent learns about the
    action it took, whose move is deterministic. The goal is absorbing (and never left: the episode ends)."""
    n_states = len(moves)
    deterministic = np.zeros((n_states, N_ACTIONS, n_states))
    deterministic[np.arange(n_states)[:, None], np.arange(N_ACTIONS), moves] = 1.0
    p = noise_prob if noise == "direction" else 0.0
    transitions = (1 - p) * deterministic + p * deterministic.mean(axis=1, keepdims=True)
    transitions[-1] = 0.0
    transitions[-1, :, -1] = 1.0
    return transitions


def value_iteration(transitions: np.ndarray, gamma: float, tol: float = 1e-12) -> np.ndarray:
    """V*(s) of the gridworld: V(s) = max_a sum_s' P(s'|s, a) (r(s') + gamma V(s')), V(goal) = 0."""
    n_states = transitions.shape[0]
    reward = np.full(n_states, -1.0)
    reward[-1] = GOAL_REWARD
    v = np.zeros(n_states)
    while True:
        new_v = (transitions @ (reward + gamma * v)).max(axis=1)
        new_v[-1] = 0.0  # nothing follows the goal
        if np.abs(new_v - v).max() < tol:
            return new_v
        v = new_v


# ---------------------------------------------------------------------------
# The agents: epsilon-greedy Q-learning in residual form
# ---------------------------------------------------------------------------


def q_values(residuals: np.ndarray, me_coef: np.ndarray) -> np.ndarray:
    """Q[..., s, :] = R[..., s, :] + k * mean(R[..., s, :]), for residuals (agents, ..., |A|) and k (agents,)."""
    k = me_coef.reshape(-1, *[1] * (residuals.ndim - 1))
    return residuals + k * residuals.mean(axis=-1, keepdims=True)


def epsilon_greedy(q: np.ndarray, explore_u: np.ndarray, choice_u: np.ndarray, epsilon: float) -> np.ndarray:
    """Actions for q (agents, |A|): with probability epsilon a uniformly random action, else a greedy one with ties
    broken uniformly at random. choice_u (uniform in [0, 1)) picks the random action or the tied greedy one."""
    best = q == q.max(axis=1, keepdims=True)
    pick = (choice_u * best.sum(axis=1)).astype(int)  # the pick-th of the tied greedy actions
    greedy = (best.cumsum(axis=1) > pick[:, None]).argmax(axis=1)
    return np.where(explore_u < epsilon, (choice_u * q.shape[1]).astype(int), greedy)


def residual_update(residuals_s: np.ndarray, action: np.ndarray, td_step: np.ndarray, me_coef: np.ndarray) -> np.ndarray:
    """R[s, b] + alpha * delta * ([a == b] + k / |A|) for each agent's row R[s, :]; td_step = alpha * delta."""
    direction = np.eye(residuals_s.shape[1])[action] + me_coef[:, None] / residuals_s.shape[1]
    return residuals_s + td_step[:, None] * direction


@dataclass
class SweepResult:
    """Per (k, step size, run): episodes completed by each horizon, the value error every value_error_interval
    steps, and the final Q table."""

    episodes: np.ndarray  # (k, step size, run, horizon)
    value_error: np.ndarray  # (k, step size, run, measurement)
    value_error_steps: np.ndarray  # the step of each measurement
    q: np.ndarray  # (k, step size, run, state, action)


@np.errstate(over="ignore", invalid="ignore")  # too large a step size diverges to inf / nan: summarize sets it aside
def simulate(args: Args, me_coefs, step_sizes, progress=None) -> SweepResult:
    """Runs args.runs agents for every (k, step size), all at once, for args.steps steps.

    The random draws: each step, rng.random((4, runs)) gives per run the uniforms (explore, choice, noise,
    direction), shared by every (k, step size). So a sub-sweep replays exactly the same runs as the full one.
    """
    moves = gridworld_moves()
    n_states, goal = len(moves), len(moves) - 1
    v_star = value_iteration(transition_matrix(moves, args.noise, args.noise_prob), args.gamma)
    shape = (len(me_coefs), len(step_sizes), args.runs)
    n_agents = math.prod(shape)
    agent_k = np.broadcast_to(np.asarray(me_coefs, float)[:, None, None], shape).ravel()
    agent_alpha = np.broadcast_to(np.asarray(step_sizes, float)[None, :, None], shape).ravel()
    agent_run = np.broadcast_to(np.arange(args.runs), shape).ravel()
    agents = np.arange(n_agents)

    residuals = np.zeros((n_agents, n_states, N_ACTIONS))  # values start at 0
    state = np.zeros(n_agents, dtype=int)  # every run starts at state 0
    completed = np.zeros(n_agents, dtype=int)
    horizons = sorted(args.horizons)
    episodes = np.zeros((n_agents, len(horizons)), dtype=int)
    checks = np.arange(0, args.steps, args.value_error_interval)
    value_error = np.zeros((n_agents, len(checks)))
    rng = np.random.default_rng(args.seed)
    for t in range(args.steps):
        for h, horizon in enumerate(horizons):
            if t == horizon - 1:  # episodes that ended before step `horizon`, as the authors count them
                episodes[:, h] = completed
        if t % args.value_error_interval == 0:
            greedy_values = q_values(residuals, agent_k).max(axis=-1)
            value_error[:, t // args.value_error_interval] = np.linalg.norm(greedy_values - v_star, axis=1)
        explore_u, choice_u, noise_u, direction_u = rng.random((4, args.runs))[:, agent_run]

        rows = residuals[agents, state]  # R[s, :] of each agent's current state
        q = q_values(rows, agent_k)
        action = epsilon_greedy(q, explore_u, choice_u, args.epsilon)
        noisy = noise_u < args.noise_prob
        direction = np.where(noisy, (direction_u * N_ACTIONS).astype(int), action)
        if args.noise == "action":  # the action itself was replaced: the agent learns about the one it took
            action = direction
        next_state = moves[state, direction]
        terminated = next_state == goal
        reward = np.where(terminated, GOAL_REWARD, -1.0)

        next_q = q_values(residuals[agents, next_state], agent_k).max(axis=1)
        target = reward + args.gamma * np.where(terminated, 0.0, next_q)
        td_error = target - q[agents, action]
        residuals[agents, state] = residual_update(rows, action, agent_alpha * td_error, agent_k)

        completed += terminated
        state = np.where(terminated, 0, next_state)  # a finished episode restarts at the start state
        if progress is not None:
            progress(t + 1)
    return SweepResult(
        episodes=episodes.reshape(*shape, len(horizons)),
        value_error=value_error.reshape(*shape, len(checks)),
        value_error_steps=checks,
        q=q_values(residuals, agent_k).reshape(*shape, n_states, N_ACTIONS),
    )


# ---------------------------------------------------------------------------
# Statistics: the best step size per k and horizon, the % increase over k = 0
# ---------------------------------------------------------------------------


def mean_and_se(x: np.ndarray, axis: int) -> tuple:
    """Mean over runs and its standard error (sample standard deviation / sqrt(runs); 0 for one run)."""
    n = x.shape[axis]
    se = x.std(axis=axis, ddof=1) / math.sqrt(n) if n > 1 else np.zeros_like(x.mean(axis=axis))
    return x.mean(axis=axis), se


def summarize(args: Args, result: SweepResult) -> dict:
    """The results JSON: for every k and horizon the best step size (highest mean, as the authors choose it) with
    the mean and standard error of completed episodes and the % increase over k = 0 (with a 95% interval by the
    delta method, k's and k = 0's means taken as independent); and the whole sweep.

    A (k, step size) where any run's values diverged (inf or nan) is not a candidate, as in the authors' script
    (there it raises, and the pair is dropped); where every step size of a k diverged, its entries are None.
    """
    mean, se = mean_and_se(result.episodes.astype(float), axis=2)  # (k, step size, horizon)
    diverged_runs = (~np.isfinite(result.q).all(axis=(3, 4))).sum(axis=2)  # (k, step size)
    candidates = np.where(diverged_runs[..., None] > 0, -np.inf, mean)
    horizons = sorted(args.horizons)
    best = {str(k): {} for k in args.me_coefs}
    for h, horizon in enumerate(horizons):
        chosen = [int(c.argmax()) if np.isfinite(c).any() else None for c in candidates[:, :, h]]  # ties: smallest
        base_k = args.me_coefs.index(0.0)
        base = chosen[base_k]
        m0, s0 = (mean[base_k, base, h], se[base_k, base, h]) if base is not None else (0.0, 0.0)
        for ki, (k, i) in enumerate(zip(args.me_coefs, chosen)):
            entry = dict.fromkeys(("step_size", "mean", "se", "percent_increase", "percent_increase_ci95_half_width"))
            if i is not None:
                m, s = mean[ki, i, h], se[ki, i, h]
                entry.update(step_size=args.step_sizes[i], mean=float(m), se=float(s))
                if m0 > 0:
                    entry["percent_increase"] = float(100 * (m - m0) / m0)
                    if k != 0.0:  # the baseline against itself has no uncertainty
                        entry["percent_increase_ci95_half_width"] = 1.96 * 100 * math.sqrt(s**2 + (m / m0 * s0) ** 2) / m0
            best[str(k)][str(horizon)] = entry
    sweep = [{"k": k, "step_size": a, "diverged_runs": int(diverged_runs[ki, ai]),
              "episodes": {str(hz): {"mean": float(mean[ki, ai, h]), "se": float(se[ki, ai, h])} for h, hz in enumerate(horizons)}}
             for ki, k in enumerate(args.me_coefs) for ai, a in enumerate(args.step_sizes)]
    last, curves = str(horizons[-1]), {}
    for k in args.value_error_coefs:
        step_size = best[str(k)][last]["step_size"]
        if step_size is not None:
            m, s = mean_and_se(result.value_error[args.me_coefs.index(k), args.step_sizes.index(step_size)], axis=0)
            curves[str(k)] = {"step_size": step_size, "mean": m.tolist(), "se": s.tolist()}
    return {"settings": asdict(args), "horizons": horizons, "best": best, "sweep": sweep,
            "value_error": {"steps": result.value_error_steps.tolist(), "best_step_size_at": horizons[-1], "curves": curves}}


# ---------------------------------------------------------------------------
# Figures and the results file
# ---------------------------------------------------------------------------


def plot_increase(summary: dict, path: str):
    """The paper's figure: % increase in completed episodes over k = 0 against k, one line per horizon."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coefs = [float(k) for k in summary["best"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for horizon in summary["horizons"]:
        points = [summary["best"][str(k)][str(horizon)] for k in coefs]
        y = np.array([p["percent_increase"] if p["percent_increase"] is not None else np.nan for p in points])
        half = np.array([p["percent_increase_ci95_half_width"] or 0.0 for p in points])
        (line,) = ax.plot(coefs, y, marker="o", label=f"{horizon} steps")
        ax.fill_between(coefs, y - half, y + half, color=line.get_color(), alpha=0.2)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xscale("symlog", linthresh=0.1)  # k = 0 and the small k stay visible on a log-like axis
    ax.set_xlim(left=0)
    ax.set_xticks(coefs, [f"{k:g}" for k in coefs])
    ax.set_xlabel("k (mean-expansion coefficient)")
    ax.set_ylabel("% increase in completed episodes over k = 0")
    ax.set_title("5x5 gridworld, best step size per k and horizon (95% intervals)")
    ax.legend()
    ax.grid(True, linestyle="--", alpha=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_value_error(summary: dict, path: str):
    """|| max_a Q(s, a) - V*(s) || against steps for a few k, each at its best step size (mean over runs, 95% band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array(summary["value_error"]["steps"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, curve in summary["value_error"]["curves"].items():
        m, s = np.array(curve["mean"]), np.array(curve["se"])
        (line,) = ax.plot(steps, m, label=f"k = {float(k):g} (step size {curve['step_size']})")
        ax.fill_between(steps, m - 1.96 * s, m + 1.96 * s, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("agent steps")
    ax.set_ylabel("|| max_a Q(s, a) - V*(s) ||  (L2 over states)")
    ax.set_title(f"Value error, best step size at {summary['value_error']['best_step_size_at']} steps")
    ax.legend()
    ax.grid(True, linestyle="--", alpha=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


OUTPUTS = ("tabular_results.json", "episodes_increase.png", "value_error.png")


def check_out_dir(out: str) -> list:
    """Problems with --out: it must be a writable directory (created if missing) holding no earlier results."""
    existing = [name for name in OUTPUTS if os.path.exists(os.path.join(out, name))]
    if existing:
        return [f"--out {out} already holds {', '.join(existing)}; choose another --out (nothing was overwritten)"]
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        return [f"--out {out} is not a writable directory: {e.strerror or e}"]
    return []


def write_atomically(path: str, write):
    """write(tmp_path), then rename over path: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}{os.path.splitext(path)[1]}"
    write(tmp)
    os.replace(tmp, path)


def main(args: Args):
    errors = check_args(args)
    errors = errors or check_out_dir(args.out)
    if errors:
        print("error: " + "\n       ".join(errors), file=sys.stderr)
        sys.exit(2)
    n_agents = len(args.me_coefs) * len(args.step_sizes) * args.runs
    print(f"{len(args.me_coefs)} k x {len(args.step_sizes)} step sizes x {args.runs} runs = {n_agents:,} agents, "
          f"{args.steps:,} steps each, noise: {args.noise} (p = {args.noise_prob})", flush=True)
    start = time.time()

    def progress(t: int):
        if t % max(1, args.steps // 10) == 0 or t == args.steps:
            elapsed = time.time() - start
            print(f"  step {t:,}/{args.steps:,}  {elapsed:.0f} s elapsed, about {elapsed * (args.steps - t) / t:.0f} s left", flush=True)

    result = simulate(args, args.me_coefs, args.step_sizes, progress)
    summary = summarize(args, result)
    summary["seconds"] = round(time.time() - start, 1)
    write_atomically(os.path.join(args.out, "episodes_increase.png"), lambda p: plot_increase(summary, p))
    write_atomically(os.path.join(args.out, "value_error.png"), lambda p: plot_value_error(summary, p))

    def write_json(path):
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)

    write_atomically(os.path.join(args.out, "tabular_results.json"), write_json)
    last = str(summary["horizons"][-1])
    print(f"done in {summary['seconds']} s. Completed episodes at the best step size ({last} steps):")
    for k, by_horizon in summary["best"].items():
        b = by_horizon[last]
        if b["step_size"] is None:
            print(f"  k = {float(k):<5g} every step size diverged")
            continue
        increase = "" if b["percent_increase"] is None else f"  {b['percent_increase']:+.1f}% over k = 0"
        print(f"  k = {float(k):<5g} step size {b['step_size']:<7g} {b['mean']:8.2f} +- {b['se']:.2f}{increase}")
    print(f"wrote {', '.join(os.path.join(args.out, name) for name in OUTPUTS)}")


if __name__ == "__main__":
    main(tyro.cli(Args))
