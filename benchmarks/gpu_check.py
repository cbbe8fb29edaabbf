"""One command for one GPU (issue 33): where a step's time goes, the training speed of both Atari scripts, runs sharing
the GPU, dqn_meanexp.py's device, a profile, then the CUDA tests; phase by phase, each with its own deadline, so that a
slow phase cannot eat the others. Writes one JSON and one markdown table.

    python benchmarks/gpu_check.py --out DIR             # on a GPU machine, in at most --budget seconds (480)
    python benchmarks/gpu_check.py --dry-run --out DIR   # the same phases on the CPU at tiny sizes, in under 3 minutes

The phases, in this order (--phases picks some, in the order given):
1. parts: each part of an agent step alone (benchmarks/bench.py): the env stack's own rate (also with one OpenCV
   thread), one action choice, one replay sample, one update (and, on a GPU, its kernels' time); the rate they allow.
2. dqn_1env, iqn_1env: the real script's training rate (agent steps per second after learning starts, at the paper's
   replay ratio, epsilon at its final 0.01; bench.py measures it) with 1 env, in each --modes: eager and CUDA graphs
   (--compile --compile-mode reduce-overhead); --compile alone, measured on the first GPU run, lost to eager. (The dry
   run: eager only.)
3. concurrent: --concurrent DQN runs at once on the one GPU, each with 1 env; each one's rate and their sum.
4. lunar: dqn_meanexp.py (the LunarLander experiment) on CUDA and on the CPU, whole runs timed.
5. profile: cProfile of the real DQN script (eager, 1 env): the functions that take the time (profile.txt).
6. tests: `pytest -m cuda tests/test_cuda.py`, each test's outcome as it ends (the dry run: a few of them, the CPU
   standing in for the GPU).
7. envs: DQN and IQN with 4 and 8 envs, eager (the dry run: DQN with 2).
A phase out of time is stopped, with every process it started, and recorded as "out of time" (the runs it finished
are kept); one that fails is recorded as "failed" with the end of its output; the next phase starts either way. DIR
gets gpu_check.json (device, date, command, versions, machine, every phase with its status and figures; rewritten after
each phase), gpu_check.md (the table), tests.log and profile.txt.
"""

import argparse
import glob
import importlib
import io
import json
import os
import platform
import pstats
import re
import shlex
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dqn_meanexp_sweep  # noqa: E402  (machine(): the CPU's model and cores)
from benchmarks import bench  # noqa: E402

PHASES = ("parts", "dqn_1env", "iqn_1env", "concurrent", "lunar", "profile", "tests", "envs")
MODES = {"eager": [], "compile": ["--compile"], "cuda graphs": ["--compile", "--compile-mode", "reduce-overhead"]}
SMALL_IQN = ["--num-tau-samples", "8", "--num-tau-prime-samples", "8", "--num-quantile-samples", "8"]
# the dry run's tests: one of each kind, with the CPU standing in for the GPU
DRY_RUN_TESTS = "one_update or plays_on_the_cpu or row[ib_iqn]"


def sizes(dry_run: bool, num_envs: int) -> dict:
    """Agent steps of one speed measurement: collected before learning, trained (measured between log points)."""
    if dry_run:
        return dict(learning_starts=100, train_steps=240 * num_envs, log_interval=80 * num_envs)
    return dict(learning_starts=1000 * num_envs, train_steps=6000 * num_envs, log_interval=500 * num_envs)


class Check:
    """The phases' results and the clock they share."""

    def __init__(self, args, results: dict):
        self.args, self.results, self.started, self.phases = args, results, time.monotonic(), []
        self.device = "cpu" if args.dry_run else "cuda"
        self.device_flags = ["--no-cuda"] if args.dry_run else []

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.started)

    def phase(self, name: str, limit: float, body):
        """Runs body(phase, deadline) with deadline = now + min(limit, what the budget has left); records its result."""
        seconds = min(limit, self.left())
        record = {"name": name, "limit_s": round(seconds, 1), "status": "ok", "results": []}
        self.phases.append(record)
        if seconds < 10:
            record["status"] = "skipped: the budget is spent"
            print(f"== {name}: skipped (the budget is spent)", flush=True)
            return
        print(f"== {name} (at most {seconds:.0f} s)", flush=True)
        start = time.monotonic()
        try:
            body(record, start + seconds)
        except TimeoutError as e:
            record["status"], record["error"] = "out of time", str(e)[-2000:]
        except Exception as e:  # a phase's failure is a result: record it, then go on with the next phase
            record["status"], record["error"] = "failed", f"{type(e).__name__}: {str(e)[-2000:]}"
        record["seconds"] = round(time.monotonic() - start, 1)
        print(f"   {name}: {record['status']} in {record['seconds']} s", flush=True)
        self.save()  # after every phase: a check stopped from outside keeps what it measured

    def save(self):
        results = {**self.results, "seconds": round(time.monotonic() - self.started, 1), "phases": self.phases}
        with open(os.path.join(self.args.out, "gpu_check.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(self.args.out, "gpu_check.md"), "w") as f:
            f.write(table(results))
        return results

    def speed(self, record: dict, deadline: float, algo: str, num_envs: int, mode: str, concurrent: int = 1):
        """One training-rate measurement of the real script (or `concurrent` of them at once), appended to the phase."""
        small = SMALL_IQN if self.args.dry_run and algo == "iqn" else []
        flags = ["--env-id", "ALE/Breakout-v5", "--num-envs", str(num_envs), "--seed", "1", *self.device_flags,
                 "--buffer-size", str(self.args.buffer_size), *MODES[mode], *small]
        start = time.monotonic()
        rates = bench.training_rates(algo, flags, concurrent, deadline=deadline, **sizes(self.args.dry_run, num_envs))
        row = {"algo": algo, "num_envs": num_envs, "mode": mode, "concurrent_runs": concurrent, "flags": flags,
               "seconds": round(time.monotonic() - start, 1), **rates}
        record["results"].append(row)
        print(f"   {algo} x{num_envs} {mode}{f' ({concurrent} runs at once)' if concurrent > 1 else ''}: "
              f"{row['training_sps']:,.0f} SPS per run, {row['total_training_sps']:,.0f} in all, "
              f"{row['updates_per_step']} updates a step ({row['seconds']} s)", flush=True)

    def tests(self, record: dict, deadline: float):
        env = {**os.environ, **({"MEANEXP_CUDA_TESTS_ON_CPU": "1"} if self.args.dry_run else {})}
        workers = str(max(1, min(8, (os.cpu_count() or 2) // 2)))
        command = [sys.executable, "-m", "pytest", "-v", "--tb=short", "-m", "cuda", "-n", workers, "--dist", "load",
                   "-p", "no:cacheprovider", *(["-k", DRY_RUN_TESTS] if self.args.dry_run else []), "tests/test_cuda.py"]
        log_path = os.path.join(self.args.out, "tests.log")
        timed_out = False
        with open(log_path, "w") as log:  # a session of its own: out of time, pytest, its workers and their runs all stop
            proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                bench.stop_group(proc)
                proc.wait()
                timed_out = True
        with open(log_path) as f:
            output = f.read()
        outcomes = re.findall(r"(PASSED|FAILED|ERROR|SKIPPED) (tests/test_cuda\.py::\S+)", output)  # -v: one line a test
        summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
        kinds = ("PASSED", "FAILED", "ERROR", "SKIPPED")
        by_outcome = {kind.lower(): sorted(t for k, t in outcomes if k == kind) for kind in kinds}
        record["results"].append({"command": " ".join(command[1:]), "returncode": proc.returncode, **by_outcome,
                                  "summary": summary[-1] if summary else f"{len(outcomes)} tests reported before the end"})
        failed = [t for k, t in outcomes if k in ("FAILED", "ERROR")]
        if timed_out:
            raise TimeoutError(f"pytest ran out of time; failed so far: {failed} (tests.log)")
        if proc.returncode != 0:
            raise RuntimeError(f"pytest exited {proc.returncode}: failed {failed} (tests.log)")

    def lunar(self, record: dict, deadline: float):
        """dqn_meanexp.py's whole run, on each device in turn: its training rate and its wall time."""
        steps, episodes = (1500, 1) if self.args.dry_run else (6000, 5)  # learning starts at step 1,000
        for device, flag in (("cuda", "--cuda"), ("cpu", "--no-cuda")):
            if device == "cuda" and self.args.dry_run:
                continue  # no GPU here: the CPU run alone exercises the phase
            with tempfile.TemporaryDirectory() as cwd:
                command = [sys.executable, os.path.join(ROOT, "dqn_meanexp.py"), flag, "--total-timesteps", str(steps),
                           "--eval-interval", str(steps), "--eval-episodes", str(episodes)]
                start = time.monotonic()
                proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                                      timeout=max(1.0, deadline - time.monotonic()))
                wall = time.monotonic() - start
                if proc.returncode != 0:
                    raise RuntimeError(f"{' '.join(command)} failed:\n{(proc.stdout + proc.stderr)[-1500:]}")
                (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
                accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
                accumulator.Reload()
                sps = accumulator.Scalars("charts/SPS")[-1].value  # training only: before the last evaluation
            row = {"device": device, "steps": steps, "eval_episodes": episodes, "training_sps": sps, "wall_s": round(wall, 1),
                   "command": " ".join(["python", "dqn_meanexp.py", *command[2:]])}
            record["results"].append(row)
            print(f"   dqn_meanexp.py on {device}: {sps:,.0f} SPS training, {wall:.1f} s in all", flush=True)

    def parts(self, record: dict, deadline: float):
        """Where a step's time goes, each part measured alone in this process (benchmarks/bench.py): the env stack's
        own rate (random actions), one action choice, one replay sample, one update (eager), and the rate they allow."""
        for algo in ("dqn", "iqn"):
            script = importlib.import_module(f"{algo}_atari_meanexp")
            args = script.parse_args(["--env-id", "ALE/Breakout-v5", *self.device_flags,
                                      *(SMALL_IQN if self.args.dry_run and algo == "iqn" else [])])
            steps = 500 if self.args.dry_run else 3000
            env_sps = bench.env_rate(script, args, steps)
            threads = cv2.getNumThreads()  # OpenCV resizes each frame with a pool of one thread a core: on 16 cores, is
            cv2.setNumThreads(1)  # waking it dearer than the work? (the env-only rate with one thread)
            env_sps_one_cv2_thread = bench.env_rate(script, args, steps)
            cv2.setNumThreads(threads)
            times = bench.component_times(script, args, torch.device(self.device), repeats=3 if self.args.dry_run else 30)
            allowed = 1 / (1 / env_sps + times["act_ms"] / 1e3 + times["update_ms"] / 1e3 / args.train_frequency)
            kernels = times["update_kernel_ms"]
            record["results"].append({"algo": algo, "env_sps": env_sps, "env_sps_one_cv2_thread": env_sps_one_cv2_thread,
                                      "cv2_threads": threads, **times, "allowed_sps": allowed})
            print(f"   {algo}: env-only {env_sps:,.0f} SPS ({env_sps_one_cv2_thread:,.0f} with one OpenCV thread), act "
                  f"{times['act_ms']:.2f} ms, sample {times['sample_ms']:.2f} ms, update {times['update_ms']:.2f} ms"
                  f"{'' if kernels is None else f' ({kernels:.2f} ms of it in GPU kernels)'}: {allowed:,.0f} SPS allowed",
                  flush=True)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{algo}'s parts ended past the deadline")

    def profile(self, record: dict, deadline: float):
        """cProfile of the real DQN script, eager, 1 env, epsilon 0.01: the functions that take a step's time (the 25
        with the most time of their own; profile.txt has 60)."""
        size = sizes(self.args.dry_run, 1)
        with tempfile.TemporaryDirectory() as cwd:
            out = os.path.join(cwd, "profile.out")
            command = [sys.executable, "-m", "cProfile", "-o", out, os.path.join(ROOT, "dqn_atari_meanexp.py"),
                       "--env-id", "ALE/Breakout-v5", *self.device_flags, "--buffer-size", str(self.args.buffer_size),
                       "--learning-starts", str(size["learning_starts"]),
                       "--total-timesteps", str(size["learning_starts"] + size["train_steps"]), "--eval-interval", "0",
                       "--final-eval-episodes", "1", "--max-episode-steps", "1000", "--checkpoint-interval", "0",
                       "--no-checkpoint-buffer", "--start-e", "0.01", "--end-e", "0.01", "--run-name", "profile"]
            proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
            try:
                _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                bench.stop_group(proc)
                proc.wait()
                raise TimeoutError("the profiled run ran out of time")
            if proc.returncode != 0:
                raise RuntimeError(f"the profiled run failed:\n{err[-1500:]}")
            text = io.StringIO()
            stats = pstats.Stats(out, stream=text).sort_stats("tottime")
            stats.print_stats(60)
            with open(os.path.join(self.args.out, "profile.txt"), "w") as f:
                f.write(f"{' '.join(command[1:])}\n{text.getvalue()}")
            top = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:25]  # (file, line, name): (cc, calls, tt, ct, _)
            record["results"] = [{"function": f"{os.path.basename(f)}:{line}({name})", "calls": calls, "own_s": round(tt, 3),
                                  "cumulative_s": round(ct, 3)} for (f, line, name), (_, calls, tt, ct, _) in top]
        for row in record["results"][:8]:
            print(f"   {row['own_s']:7.2f} s own, {row['cumulative_s']:7.2f} s with callees: {row['function']}", flush=True)

    def run(self):
        dry = self.args.dry_run
        modes = self.args.modes or (["eager"] if dry else ["eager", "cuda graphs"])  # on a GPU --compile alone lost to eager
        limits = dict(parts=30, dqn_1env=40, iqn_1env=40, concurrent=30, lunar=20, profile=30, tests=60, envs=40) if dry \
            else dict(parts=40, dqn_1env=90, iqn_1env=90, concurrent=70, lunar=40, profile=40, tests=150, envs=120)
        envs = [(algo, n) for algo in (["dqn"] if dry else ["dqn", "iqn"]) for n in ([2] if dry else [4, 8])]
        bodies = {
            "tests": self.tests,
            "parts": self.parts,
            "dqn_1env": lambda r, d: [self.speed(r, d, "dqn", 1, mode) for mode in modes],
            "iqn_1env": lambda r, d: [self.speed(r, d, "iqn", 1, mode) for mode in modes],
            "concurrent": lambda r, d: self.speed(r, d, "dqn", 1, "eager", concurrent=self.args.concurrent),
            "lunar": self.lunar,
            "profile": self.profile,
            "envs": lambda r, d: [self.speed(r, d, algo, n, "eager") for algo, n in envs],
        }
        for name in self.args.phases:
            self.phase(name, limits[name], bodies[name])

def machine_line() -> dict:
    import ale_py
    import gymnasium

    cpu = dqn_meanexp_sweep.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"device": gpu or f"cpu ({cpu})", "cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                         "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
                         "gymnasium": gymnasium.__version__, "ale_py": ale_py.__version__, "numpy": np.__version__}}


def table(results: dict) -> str:
    """The markdown the README and benchmarks/README.md quote: one line per phase, one row per speed measurement."""
    lines = [f"{results['device']} ({results['cpus']} CPUs), torch {results['versions']['torch']} (CUDA "
             f"{results['versions']['cuda']}), {results['date']}: `{results['command']}`", ""]
    for phase in results["phases"]:
        lines.append(f"- {phase['name']}: {phase['status']}" + (f" in {phase['seconds']} s" if "seconds" in phase else "") +
                     (f" ({phase['results'][0]['summary']})" if phase["name"] == "tests" and phase["results"] else ""))
    lines += ["", "| algo | envs | runs at once | mode | training SPS per run | SPS in all | updates per step |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for phase in results["phases"]:
        for row in phase["results"]:
            if "training_sps" in row and "algo" in row:
                lines.append(f"| {row['algo']} | {row['num_envs']} | {row['concurrent_runs']} | {row['mode']} | "
                             f"{row['training_sps']:,.0f} | {row['total_training_sps']:,.0f} | "
                             f"{row['updates_per_step']:.3f} |")
    lunar = [row for phase in results["phases"] if phase["name"] == "lunar" for row in phase["results"]]
    if lunar:
        lines += ["", "| dqn_meanexp.py on | steps | training SPS | whole run (s) |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['device']} | {r['steps']:,} | {r['training_sps']:,.0f} | {r['wall_s']} |" for r in lunar]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="a folder for the results (made if missing)")
    parser.add_argument("--dry-run", action="store_true", help="the same phases on the CPU at tiny sizes (under 3 minutes)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all phases (default 480; the dry run 240)")
    parser.add_argument("--concurrent", type=int, default=None, help="DQN runs at once on the GPU (default 8; the dry run 2)")
    parser.add_argument("--buffer-size", type=int, default=None,
                        help="the runs' --buffer-size (default 200,000: 1.4 GB each, written at the start; dry run 20,000)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="the phases to run, in this order")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=None,
                        help="the modes of the 1-env phases (default: all; the dry run: eager and compile)")
    args = parser.parse_args(argv)
    args.budget = args.budget or (240.0 if args.dry_run else 480.0)
    args.buffer_size = args.buffer_size or (20_000 if args.dry_run else 200_000)
    args.concurrent = args.concurrent or (2 if args.dry_run else 8)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --dry-run on a machine without one")
    if args.budget <= 0 or args.concurrent < 1 or args.buffer_size < 1000:
        parser.error("--budget must be > 0, --concurrent >= 1 and --buffer-size >= 1000")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {args.out}: {e}")
    results = {**machine_line(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "command": shlex.join(["python", "benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
               "dry_run": args.dry_run, "budget_s": args.budget}
    check = Check(args, results)
    print(f"gpu_check: {results['device']}, torch {torch.__version__}, budget {args.budget:.0f} s", flush=True)
    check.run()
    results = check.save()
    print(table(results), flush=True)
    return results

if __name__ == "__main__":
    main()
