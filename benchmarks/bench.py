"""Throughput and memory of both scripts, against the limit the parts of one agent step set.

    python benchmarks/bench.py                          # DQN and IQN, 1 env, the paper's env settings
    python benchmarks/bench.py --num-envs 1 2 4 8 16    # a table of rate vs --num-envs
    python benchmarks/bench.py --quick                  # under a minute on CPU (the tests run it)
    python benchmarks/bench.py --algos dqn --concurrent 1 2 4 8 --json benchmarks/results/RESULT.json

For each algorithm and number of envs it measures, on the device the scripts would use:
- env-only rate: random actions through the scripts' own env stack (make_train_envs): the limit;
- ms per action choice (one forward pass for all envs), per replay sample, per update (sample + gradient step), and on
  a GPU the time an update's kernels take on it (update_kernel_ms);
- the rate those allow: 1 / (env time + acting time / envs + update time / train frequency), per agent step;
- the training-phase rate of the real script (its main() in a subprocess, after learning starts,
  evaluation off), read from the wall times of its TensorBoard points, and its share of the rate allowed;
- the script's peak resident memory, peak GPU memory (with CUDA), and replay bytes per transition.
With --concurrent N, N copies of the real script train at once on the same machine (and GPU), and each
one's rate is reported: `training_sps` is then the mean rate of one run, `total_training_sps` their sum.
It prints a table and, with --json PATH, writes {"device", "date", "command", "versions", "machine", "rows"}.
"""

import argparse
import copy
import glob
import importlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dqn_meanexp_sweep  # noqa: E402  (machine(): the CPU's model for a result file)


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
    loss_fn = script.LOSS
    if args.compile:  # as the scripts' main() compiles: the whole loss, and acting
        loss_fn = torch.compile(script.LOSS, dynamic=False, mode=args.compile_mode)
        network.q_values = torch.compile(network.q_values, dynamic=False, mode=args.compile_mode)
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
    def update():
        return script.update(network, target, optimizer, rb.sample(args.batch_size), args, loss_fn)

    result = {
        "act_ms": 1e3 * timed(act, repeats * 5, device),
        "sample_ms": 1e3 * timed(lambda: rb.sample(args.batch_size), repeats * 5, device),
        "update_ms": 1e3 * timed(update, repeats, device),
    }
    result["update_kernel_ms"] = kernel_ms(update, repeats) if device.type == "cuda" else None
    result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return result


def kernel_ms(fn, repeats: int) -> float:
    """GPU time the kernels of one call of fn take (PyTorch's profiler): set against the call's wall time, whether the
    GPU or the launching of its kernels sets the pace."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    return sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events) / 1e3 / repeats


def start_training(algo: str, flags: list, threads: int, learning_starts: int, train_steps: int, log_interval: int) -> dict:
    """Starts the real script in a folder of its own, evaluation and checkpoints off; finish_training() reads it."""
    cwd = tempfile.TemporaryDirectory()
    # epsilon at its final 0.01 from the start: the rate of the 98% of a run after exploration (where nearly every
    # step runs the network to act), not of its first million steps
    command = [sys.executable, os.path.join(ROOT, f"{algo}_atari_meanexp.py"), *flags, "--run-name", "bench",
               "--learning-starts", str(learning_starts), "--total-timesteps", str(learning_starts + train_steps),
               "--log-interval", str(log_interval), "--eval-interval", "0", "--final-eval-episodes", "1",
               "--checkpoint-interval", "0", "--no-checkpoint-buffer", "--progress-interval", "1000000",
               "--start-e", "0.01", "--end-e", "0.01"]
    log = open(os.path.join(cwd.name, "output.txt"), "w+")  # a file, not a pipe: runs waited for one by one never block
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    # a session of its own: stopping it (stop_group) stops its env workers and anything else it started too
    proc = subprocess.Popen(command, cwd=cwd.name, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return {"proc": proc, "log": log, "cwd": cwd, "command": command, "learning_starts": learning_starts,
            "log_interval": log_interval, "total": learning_starts + train_steps}


def updates_logged(run: dict) -> list:
    """The charts/updates points the run's TensorBoard log holds on disk so far."""
    found = glob.glob(os.path.join(run["cwd"].name, "runs", "bench"))
    if not found:
        return []
    accumulator = EventAccumulator(found[0], size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator.Scalars("charts/updates") if "charts/updates" in accumulator.Tags()["scalars"] else []


def finish_training(run: dict, deadline: float = float("inf"), skip_final_evaluation: bool = False) -> dict:
    """Waits for a started script: its rate between two log points after learning starts, and its peak resident memory.
    skip_final_evaluation: stops it once its training's last point is on disk (the end-of-training checkpoint writes
    it), before its final evaluation. Past `deadline` (time.monotonic()), stops it and raises TimeoutError."""
    proc, cwd, log = run["proc"], run["cwd"], run["log"]
    last = run["total"] - run["total"] % run["log_interval"]  # the step of the last log point
    stopped = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # this process's own peak memory
        if pid:
            break
        late = time.monotonic() > deadline
        if late or (skip_final_evaluation and any(p.step >= last for p in updates_logged(run))):
            stopped = "deadline" if late else "trained"
            stop_group(proc)
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not signal or wait for it again
    log.seek(0)
    output = log.read()
    log.close()
    if stopped == "deadline" or (proc.returncode != 0 and stopped is None):
        cwd.cleanup()
        error = TimeoutError if stopped == "deadline" else RuntimeError
        raise error(f"{' '.join(run['command'])} {'ran out of time' if stopped else 'failed'}:\n{output[-3000:]}")
    points = updates_logged(run)
    cwd.cleanup()
    start = run["learning_starts"] + run["log_interval"]
    points = [p for p in points if p.step > start]
    first, last = points[0], points[-1]  # from one log point after learning starts to the last before the end
    return {"training_sps": (last.step - first.step) / (last.wall_time - first.wall_time),
            "updates_per_step": (last.value - first.value) / (last.step - first.step),
            "peak_rss_bytes": usage.ru_maxrss * 1024}


def stop_group(proc: subprocess.Popen):
    """SIGKILL to a process started with start_new_session=True and to every process of its session."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group has ended already
        pass


def training_rates(algo: str, flags: list, concurrent: int, deadline: float = float("inf"), **sizes) -> dict:
    """`concurrent` copies of the script started together, the CPU cores shared out between them as run_all.sh
    does (OMP_NUM_THREADS, unless set); each one's rate, their mean and their sum. Each is stopped once trained (its
    final evaluation is not measured), and all of them at `deadline` (time.monotonic(): TimeoutError)."""
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, os.cpu_count() // concurrent))
    runs = [start_training(algo, flags, threads, **sizes) for _ in range(concurrent)]
    try:
        results = [finish_training(run, deadline, skip_final_evaluation=True) for run in runs]
    except (RuntimeError, TimeoutError):  # one run failed or ran out of time: stop the others too, then report it
        for run in runs:
            stop_group(run["proc"])
            run["proc"].wait()
            run["cwd"].cleanup()
        raise
    rates = [r["training_sps"] for r in results]
    return {"threads_per_run": threads, "training_sps": float(np.mean(rates)), "sps_is_per_run": True,
            "per_run_training_sps": rates,
            "total_training_sps": float(np.sum(rates)), "updates_per_step": results[0]["updates_per_step"],
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results)}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", nargs="+", default=["dqn", "iqn"], choices=["dqn", "iqn"])
    parser.add_argument("--num-envs", nargs="+", type=positive_int, default=[1])
    parser.add_argument("--concurrent", nargs="+", type=positive_int, default=[1],
                        help="runs of the real script training at once, one row per value (default: 1)")
    parser.add_argument("--env-id", default="ALE/Breakout-v5")
    parser.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=True, help="use CUDA when there is one")
    parser.add_argument("--compile", action="store_true", help="the scripts' --compile (torch.compile the networks)")
    parser.add_argument("--quick", action="store_true", help="a few hundred steps of each: under a minute on CPU")
    parser.add_argument("--buffer-size", type=positive_int, default=None,
                        help="the scripts' --buffer-size (default: theirs, 1,000,000, whose 7 GB a run writes at its start; "
                             "--quick: 100,000)")
    parser.add_argument("--ale-vector-env", action="store_true", help="also measure ale-py's AtariVectorEnv (env only)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON here (a new file)")
    args = parser.parse_args()
    if args.json is not None and os.path.exists(args.json):  # before minutes of measuring, not after
        parser.error(f"--json {args.json} exists: choose a new file (nothing was overwritten)")
    if args.json is not None and not os.access(os.path.dirname(os.path.abspath(args.json)), os.W_OK):
        parser.error(f"--json {args.json}: its folder does not exist or is not writable")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    sizes = dict(env_steps=400, repeats=3, learning_starts=300, train_steps=240, log_interval=80) if args.quick else \
        dict(env_steps=5000, repeats=20, learning_starts=5000, train_steps=4000, log_interval=500)
    rows = []
    for algo in args.algos:
        script = importlib.import_module(f"{algo}_atari_meanexp")
        for num_envs in args.num_envs:
            flags = ["--env-id", args.env_id, "--num-envs", str(num_envs), "--seed", "1"]
            buffer_size = args.buffer_size or (100_000 if args.quick else None)
            flags += [] if buffer_size is None else ["--buffer-size", str(buffer_size)]
            flags += [] if args.cuda else ["--no-cuda"]
            flags += ["--compile"] if args.compile else []
            if args.quick and algo == "iqn":  # CPU-sized quantile samples keep --quick under a minute
                flags += ["--num-tau-samples", "8", "--num-tau-prime-samples", "8", "--num-quantile-samples", "8"]
            script_args = script.parse_args(flags)
            env_sps = env_rate(script, script_args, sizes["env_steps"] * num_envs)
            ale_sps = ale_vector_rate(script_args, sizes["env_steps"] * num_envs) if args.ale_vector_env else None
            parts = {"env_sps": env_sps, "env_ms": 1e3 / env_sps, "ale_vector_env_sps": ale_sps,
                     **component_times(script, script_args, device, sizes["repeats"])}
            per_step = 1 / env_sps + parts["act_ms"] / 1e3 / num_envs + parts["update_ms"] / 1e3 / script_args.train_frequency
            for concurrent in args.concurrent:
                row = {"algo": algo, "num_envs": num_envs, "concurrent_runs": concurrent, "env_id": args.env_id,
                       "device": str(device), "flags": flags, **parts, "allowed_sps": 1 / per_step,
                       **training_rates(algo, flags, concurrent, learning_starts=sizes["learning_starts"],
                                        train_steps=sizes["train_steps"] * num_envs,
                                        log_interval=sizes["log_interval"] * num_envs),
                       "replay_bytes_per_transition": script.ReplayBuffer.bytes_needed(1_000_000, num_envs) / 1_000_000}
                # --quick times a few dozen updates under whatever else runs: its shares would be noise (issue 34 saw
                # 515%), so it gives none; its rates only show that every part runs
                row["share_of_allowed"] = None if args.quick else row["training_sps"] / row["allowed_sps"]
                row["share_of_env_only"] = None if args.quick else row["training_sps"] / row["env_sps"]
                rows.append(row)
                print_row(row)
    if args.json is not None:
        write_results(args.json, device, args.quick, rows)
    return rows


def print_row(row: dict):
    ale = f" (AtariVectorEnv {row['ale_vector_env_sps']:,.0f})" if row["ale_vector_env_sps"] is not None else ""
    together = "" if row["concurrent_runs"] == 1 else \
        f" | {row['concurrent_runs']} runs at once: {row['total_training_sps']:,.0f} SPS in total"
    shares = ("(--quick: too few steps for a share of either)" if row["share_of_allowed"] is None else
              f"= {100 * row['share_of_allowed']:.0f}% of allowed, {100 * row['share_of_env_only']:.0f}% of env-only")
    print(f"{row['algo']} x{row['num_envs']}: env-only {row['env_sps']:,.0f} SPS{ale} | act {row['act_ms']:.2f} ms | sample "
          f"{row['sample_ms']:.2f} ms | update {row['update_ms']:.1f} ms | allowed {row['allowed_sps']:,.0f} SPS | "
          f"training {row['training_sps']:,.0f} SPS per run {shares}{together} | peak RSS "
          f"{row['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)


def write_results(path: str, device: torch.device, quick: bool, rows: list):
    """The JSON a result file under benchmarks/results/ holds: where, when and how it was measured, then the rows."""
    import ale_py
    import gymnasium

    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "gymnasium": gymnasium.__version__,
                     "ale_py": ale_py.__version__, "numpy": np.__version__, "cuda": torch.version.cuda},
        "machine": {"cpu": dqn_meanexp_sweep.machine(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "quick": quick},
        "rows": rows,
    }
    with open(path, "x") as f:  # "x": never over an existing file
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
