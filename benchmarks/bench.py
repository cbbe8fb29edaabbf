"""Throughput and memory of both scripts, against the limit the parts of one agent step set.

    python benchmarks/bench.py                          # DQN and IQN, 1 env, the paper's env settings
    python benchmarks/bench.py --num-envs 1 2 4 8 16    # a table of rate vs --num-envs
    python benchmarks/bench.py --quick                  # under a minute on CPU (the tests run it)

For each algorithm and number of envs it measures, on the device the scripts would use:
- env-only rate: random actions through the scripts' own env stack (make_train_envs): the limit;
- ms per action choice (one forward pass for all envs), per replay sample, per update (sample + gradient step);
- the rate those allow: 1 / (env time + acting time / envs + update time / train frequency), per agent step;
- the training-phase rate of the real script (its main() in a subprocess, after learning starts,
  evaluation off), read from the wall times of its TensorBoard points, and its share of the rate allowed;
- the script's peak resident memory, peak GPU memory (with CUDA), and replay bytes per transition.
It prints a table and writes JSON (--out).
"""

import argparse
import copy
import glob
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def env_rate(script, args, steps: int) -> float:
    """Agent steps per second of random play through the scripts' env stack (autoreset steps not counted)."""
    envs = script.make_train_envs(args, run_dir="")
    envs.reset(seed=args.seed)
    rng = np.random.default_rng(0)
    starting = np.zeros(args.num_envs, dtype=bool)
    done, start = 0, None
    while done < steps:
        if done >= steps // 10 and start is None:  # the first tenth warms up (worker start, first resets)
            start, counted = time.perf_counter(), done
        _, _, terminated, truncated, _ = envs.step(rng.integers(envs.single_action_space.n, size=args.num_envs))
        done += int((~starting).sum())
        starting = terminated | truncated
    rate = (done - counted) / (time.perf_counter() - start)
    envs.close()
    return rate


def ale_vector_rate(args, steps: int) -> float:
    """The same, through ale-py's own AtariVectorEnv (C++ threads, its own preprocessing), set up like the scripts' env."""
    from ale_py.vector_env import AtariVectorEnv

    game = re.sub(r"(?<!^)(?=[A-Z])", "_", args.env_id.split("/")[-1].split("-")[0].replace("NoFrameskip", "")).lower()
    envs = AtariVectorEnv(game, args.num_envs, repeat_action_probability=args.sticky_action_prob,
                          full_action_space=args.full_action_space, frameskip=args.frame_skip, noop_max=args.noop_max,
                          episodic_life=args.episodic_life, use_fire_reset=args.fire_reset, reward_clipping=False,
                          max_num_frames_per_episode=args.max_episode_steps * args.frame_skip)
    envs.reset(seed=args.seed)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps // args.num_envs):
        envs.step(rng.integers(envs.single_action_space.n, size=args.num_envs))
    rate = steps // args.num_envs * args.num_envs / (time.perf_counter() - start)
    envs.close()
    return rate


def timed(fn, repeats: int, device) -> float:
    """Seconds per call, after two warm-up calls, with the device's queue drained."""
    for _ in range(3):  # the first calls also compile, with --compile
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def component_times(script, args, device, repeats: int) -> dict:
    """Acting, sampling and update times with the script's own network, buffer, loss and optimizer."""
    n_actions = 18
    network = script.make_network(args, n_actions, float(n_actions)).to(device)
    target, optimizer = copy.deepcopy(network), script.make_optimizer(args, network)
    if args.compile:  # as the scripts do
        network.compile(dynamic=False)
        target.compile(dynamic=False)
    rb = script.ReplayBuffer(20_000, args.num_envs, device, seed=0)
    frames = np.random.default_rng(0).integers(0, 256, (args.num_envs, 84, 84), dtype=np.uint8)
    zeros = np.zeros(args.num_envs)
    for i in range(rb.slots):
        rb.add(frames, np.full(args.num_envs, i % 1000 == 0), zeros, zeros, zeros.astype(bool), zeros.astype(bool))
    obs = torch.as_tensor(np.random.default_rng(1).integers(0, 256, (args.num_envs, 4, 84, 84), dtype=np.uint8), device=device)

    def act():
        with torch.no_grad():
            return network.q_values(obs).argmax(dim=1).cpu().numpy()  # as the loop acts: the actions come back to the host

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = {
        "act_ms": 1e3 * timed(act, repeats * 5, device),
        "sample_ms": 1e3 * timed(lambda: rb.sample(args.batch_size), repeats * 5, device),
        "update_ms": 1e3 * timed(lambda: script.update(network, target, optimizer, rb.sample(args.batch_size), args), repeats, device),
    }
    result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return result


def training_rate(algo: str, flags: list, learning_starts: int, train_steps: int, log_interval: int) -> dict:
    """The real script: its rate between two log points after learning starts, and its peak resident memory."""
    with tempfile.TemporaryDirectory() as cwd:
        command = [sys.executable, os.path.join(ROOT, f"{algo}_atari_meanexp.py"), *flags, "--run-name", "bench",
                   "--learning-starts", str(learning_starts), "--total-timesteps", str(learning_starts + train_steps),
                   "--log-interval", str(log_interval), "--eval-interval", "0", "--final-eval-episodes", "1",
                   "--checkpoint-interval", "0", "--no-checkpoint-buffer", "--progress-interval", "1000000"]
        proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        output = proc.stdout.read()
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{output}")
        accumulator = EventAccumulator(glob.glob(os.path.join(cwd, "runs", "bench"))[0], size_guidance={"scalars": 0})
        accumulator.Reload()
        points = [p for p in accumulator.Scalars("charts/updates") if p.step > learning_starts + log_interval]
        first, last = points[0], points[-1]  # from one log point after learning starts to the last before the end
        return {"train_sps": (last.step - first.step) / (last.wall_time - first.wall_time),
                "updates_per_step": (last.value - first.value) / (last.step - first.step),
                "peak_rss_bytes": usage.ru_maxrss * 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", nargs="+", default=["dqn", "iqn"], choices=["dqn", "iqn"])
    parser.add_argument("--num-envs", nargs="+", type=int, default=[1])
    parser.add_argument("--env-id", default="ALE/Breakout-v5")
    parser.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=True, help="use CUDA when there is one")
    parser.add_argument("--compile", action="store_true", help="the scripts' --compile (torch.compile the networks)")
    parser.add_argument("--quick", action="store_true", help="a few hundred steps of each: under a minute on CPU")
    parser.add_argument("--ale-vector-env", action="store_true", help="also measure ale-py's AtariVectorEnv (env only)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    sizes = dict(env_steps=400, repeats=3, learning_starts=300, train_steps=240, log_interval=80) if args.quick else \
        dict(env_steps=5000, repeats=20, learning_starts=5000, train_steps=4000, log_interval=500)
    rows = []
    for algo in args.algos:
        script = importlib.import_module(f"{algo}_atari_meanexp")
        for num_envs in args.num_envs:
            flags = ["--env-id", args.env_id, "--num-envs", str(num_envs), "--seed", "1"] + ([] if args.cuda else ["--no-cuda"])
            flags += ["--compile"] if args.compile else []
            if args.quick and algo == "iqn":  # CPU-sized quantile samples keep --quick under a minute
                flags += ["--num-tau-samples", "8", "--num-tau-prime-samples", "8", "--num-quantile-samples", "8"]
            script_args = script.parse_args(flags)
            row = {"algo": algo, "num_envs": num_envs, "env_id": args.env_id, "device": str(device), "flags": flags,
                   "env_sps": env_rate(script, script_args, sizes["env_steps"] * num_envs),
                   "ale_vector_env_sps": ale_vector_rate(script_args, sizes["env_steps"] * num_envs) if args.ale_vector_env else None,
                   **component_times(script, script_args, device, sizes["repeats"]),
                   **training_rate(algo, flags, sizes["learning_starts"], sizes["train_steps"] * num_envs, sizes["log_interval"] * num_envs),
                   "replay_bytes_per_transition": script.ReplayBuffer.bytes_needed(1_000_000, num_envs) / 1_000_000}
            per_step = 1 / row["env_sps"] + row["act_ms"] / 1e3 / num_envs + row["update_ms"] / 1e3 / script_args.train_frequency
            row["allowed_sps"] = 1 / per_step
            row["share_of_allowed"] = row["train_sps"] / row["allowed_sps"]
            row["share_of_env_only"] = row["train_sps"] / row["env_sps"]
            rows.append(row)
            ale = f" (AtariVectorEnv {row['ale_vector_env_sps']:,.0f})" if args.ale_vector_env else ""
            print(f"{algo} x{num_envs}: env-only {row['env_sps']:,.0f} SPS{ale} | act {row['act_ms']:.2f} ms | sample "
                  f"{row['sample_ms']:.2f} ms | update {row['update_ms']:.1f} ms | allowed {row['allowed_sps']:,.0f} SPS | "
                  f"training {row['train_sps']:,.0f} SPS = {100 * row['share_of_allowed']:.0f}% of allowed, "
                  f"{100 * row['share_of_env_only']:.0f}% of env-only | peak RSS {row['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "device": str(device),
               "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "date": time.strftime("%Y-%m-%d"),
               "torch_threads": torch.get_num_threads(), "quick": args.quick}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
