"""The least wall time the LunarLander sweep could take on this machine, as dqn_meanexp_sweep.py runs it (a worker per
core, its members in lockstep), against the GEMM floor: what the sweep must compute at least, each piece timed here
on one core, times how often the sweep's own records say it ran.

    python benchmarks/sweep_bound.py                 # reads results/lunar_sweep; run it on a quiet machine
    python benchmarks/sweep_bound.py --json benchmarks/results/DATE_sweep_bound.json

The pieces, each measured with --members members (a worker's share of a part), the best of three rounds:
- products: the self time of aten::bmm and aten::baddbmm in a profile of the compiled Population.update (the update's
  batched matrix products: the online network's forward and backward, which the floor counts, and the target
  network's forward);
- element-wise: the self time of the compiled graph in the same profile (the kernels torch.compile fuses out of the
  rest of the math: the ReLUs and their masks, the head, the TD error and its gradient, the bias sums);
- Adam: the self time of aten::_fused_adam_ in the same profile (the kernel alone, none of the optimizer's Python);
- an env step through dqn_meanexp.make_env's wrappers (random actions), for training and evaluation alike;
- a forward of the members at batch 1 (Population.q_values): each acting step where some member acts greedily
  (expected count from the epsilon schedule), and each lockstep evaluation step (at least as many as the worker's
  longest-playing member takes in that evaluation).
Everything else (drawing the batches, the gather, the replay, the optimizer's and the loop's Python) counts as zero, and the
pieces are timed on a quiet core with a warm cache (the sweep's two workers share the memory bus and the last-level
cache), so the sum is a lower bound: no run of this design on this machine can be faster.
"""

import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import torch
from torch.profiler import profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dqn_meanexp  # noqa: E402
import dqn_meanexp_sweep  # noqa: E402
from benchmarks.lunar_eval_step import us_per_call  # noqa: E402

REPEATS = 3


def sweep_counts(folder: str) -> list:
    """Per part and worker: the counts of each piece, read from the part records and the members' evaluations.json."""
    parts, schedules = [], {}
    for path in sorted(glob.glob(os.path.join(folder, "parts", "*.json"))):  # as sweep_time.py: records only
        with open(path) as f:
            part = json.load(f)
        workers = []
        for w in range(part["workers"]):  # run_part deals the members out as todo[w::workers]
            lengths, config = [], None
            for k, seed in part["members"][w::part["workers"]]:
                with open(os.path.join(dqn_meanexp_sweep.member_dir(folder, k, seed), "evaluations.json")) as f:
                    data = json.load(f)
                config = data["config"]
                lengths.append([e["episodes"] * e["length"] for e in data["evaluations"]])  # env steps per evaluation
            m, steps = len(lengths), config["total_timesteps"]
            schedule = (config["start_e"], config["end_e"], config["exploration_steps"], steps)
            if schedule not in schedules:  # the same for every worker of a sweep: computed once
                schedules[schedule] = np.array([dqn_meanexp.linear_schedule(*schedule[:3], t) for t in range(steps)])
            epsilon = schedules[schedule]
            workers.append({"updates": part["workers_detail"][w]["updates_per_member"], "train_env_steps": m * steps,
                            "act_forwards": float(np.sum(1 - epsilon**m)),  # some member is greedy: one forward
                            "eval_env_steps": float(np.sum(lengths)),
                            "eval_forwards": float(np.sum(np.max(lengths, axis=0))), "members": m})
        parts.append({"wall": part["wall_seconds"], "floor": part["floor_seconds"], "flop": part["flop"],
                      "workers": workers})
    return parts


def measure(members: int, calls: int) -> dict:
    """Seconds of each piece on one core, the best of REPEATS rounds: one compiled update's products, element-wise
    kernels and Adam kernel, one env step, one batch-1 forward."""
    torch.set_num_threads(1)  # as a sweep worker
    args = dqn_meanexp.Args(buffer_size=10_000)
    pop = dqn_meanexp_sweep.Population(args, [(4.0, seed) for seed in range(1, members + 1)], compile=True)
    g = torch.Generator().manual_seed(0)
    o = pop.obs_size
    pop.replay[:, :2 * o] = torch.randn(len(pop.replay), 2 * o, generator=g) * 5  # obs, next_obs
    pop.replay[:, 2 * o] = torch.randint(0, pop.n_actions, (len(pop.replay),), generator=g).float()
    pop.replay[:, 2 * o + 1:] = torch.randn(len(pop.replay), 2, generator=g).clamp(0, 1)  # reward, terminated
    pop.size = pop.capacity
    for _ in range(20):  # compiles
        pop.update()
    env = dqn_meanexp.make_env(args.env_id)
    env.reset(seed=0)
    rng = np.random.default_rng(0)

    def env_step():
        _, _, terminated, truncated, _ = env.step(int(rng.integers(pop.n_actions)))
        if terminated or truncated:
            env.reset()

    obs = np.zeros((members, o), np.float32)
    best = {}
    for _ in range(REPEATS):  # the best of each piece: the VM's neighbours only ever slow it down
        with profile() as prof:
            for _ in range(calls // 10):
                pop.update()
        us = {e.key: e.self_cpu_time_total / (calls // 10) / 1e6 for e in prof.key_averages()}
        times = {"products": us.get("aten::bmm", 0) + us.get("aten::baddbmm", 0),
                 "elementwise": sum(t for key, t in us.items() if key.startswith("## Call CompiledFxGraph")),
                 "adam": us.get("aten::_fused_adam_", 0), "env_step": us_per_call(env_step, calls) / 1e6,
                 "forward": us_per_call(lambda: pop.q_values(obs).numpy(), calls) / 1e6}
        best = {name: min(t, best.get(name, t)) for name, t in times.items()}
    return best


def bound(parts: list, cost: dict) -> dict:
    """Seconds of each piece in the sweep (per part its slowest worker, summed over the parts), and the totals."""
    pieces = {"products": ("updates", "products"), "element-wise kernels": ("updates", "elementwise"),
              "Adam kernel": ("updates", "adam"),
              "training env steps": ("train_env_steps", "env_step"), "acting forwards": ("act_forwards", "forward"),
              "evaluation env steps": ("eval_env_steps", "env_step"), "evaluation forwards": ("eval_forwards", "forward")}
    seconds = dict.fromkeys(pieces, 0.0)
    total = 0.0
    for part in parts:
        per_worker = [{name: w[count] * cost[c] for name, (count, c) in pieces.items()} for w in part["workers"]]
        slowest = max(per_worker, key=lambda s: sum(s.values()))  # a part ends with its last worker
        for name in pieces:
            seconds[name] += slowest[name]
        total += sum(slowest.values())
    return {"seconds": seconds, "bound": total, "floor": sum(p["floor"] for p in parts),
            "wall": sum(p["wall"] for p in parts), "flop": sum(p["flop"] for p in parts)}


def markdown(result: dict, cost: dict, members: int, gemm_gflops: float) -> str:
    """The pieces against the floor at this run's own GEMM rate (timed at the same time), then against the parts'."""
    floor, floor_now = result["floor"], result["flop"] / (gemm_gflops * 1e9)
    lines = [f"Costs on one core ({members} members): products {cost['products'] * 1e3:.2f} ms, element-wise kernels "
             f"{cost['elementwise'] * 1e3:.2f} ms and Adam's kernel {cost['adam'] * 1e3:.2f} ms an update, an env step "
             f"{cost['env_step'] * 1e6:.1f} us, a batch-1 forward {cost['forward'] * 1e6:.1f} us.", "",
             "| piece | minutes | x the floor now |", "| --- | --- | --- |"]
    for name, s in result["seconds"].items():
        lines.append(f"| {name} | {s / 60:.1f} | {s / floor_now:.2f}x |")
    lines.append(f"| **lower bound** | {result['bound'] / 60:.1f} | {result['bound'] / floor_now:.2f}x |")
    lines.append(f"| floor now (the sweep's FLOP at this run's GEMM rate, {gemm_gflops:.0f} GFLOP/s) | "
                 f"{floor_now / 60:.1f} | 1.00x |")
    lines += ["", f"The parts' own floors (their GEMM rates when they ran) add up to {floor / 60:.1f} min: against "
              f"them the bound is {result['bound'] / floor:.2f}x and the sweep's measured wall time, "
              f"{result['wall'] / 60:.1f} min, {result['wall'] / floor:.2f}x."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="results/lunar_sweep", help="the sweep's folder (default: %(default)s)")
    parser.add_argument("--members", type=int, default=5, help="members a worker (default: %(default)s, a one-k part's)")
    parser.add_argument("--calls", type=int, default=5000, help="timed calls of each piece a round (updates: a tenth)")
    parser.add_argument("--json", help="also write the results here (a new file)")
    args = parser.parse_args()
    if args.json and os.path.exists(args.json):
        sys.exit(f"error: {args.json} exists: choose a new file")
    if not os.path.isdir(os.path.join(args.folder, "parts")):
        sys.exit(f"error: no part records under {os.path.join(args.folder, 'parts')}")
    counts = sweep_counts(args.folder)
    gemm = dqn_meanexp_sweep.gemm_gflops()  # on all threads, as the parts measured it, before measure() takes one
    cost = measure(args.members, args.calls)
    result = bound(counts, cost)
    print(markdown(result, cost, args.members, gemm), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "command": "python benchmarks/sweep_bound.py " + " ".join(
                sys.argv[1:]), "machine": dqn_meanexp_sweep.machine(),
                "torch": torch.__version__, "members": args.members, "costs_seconds": cost, "gemm_gflops": gemm,
                **result}, f, indent=2)
