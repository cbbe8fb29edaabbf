"""Resident memory of one LunarLander sweep worker as it trains, with and without the sweep's two malloc settings.

    python benchmarks/sweep_memory.py --json benchmarks/results/DATE_sweep_memory.json

One worker of 10 members (k = 0 and 4, seeds 1-5) trains 3,000 steps (updates from step 200) in a fresh process per
case: eager or compiled update, and "default malloc" (glibc as it comes) or "sweep's malloc" (what run_part and train
set: a fixed MALLOC_MMAP_THRESHOLD_ of 32 MiB, and malloc_trim at each target sync). Prints the process's resident
memory every 500 steps; a worker of the real sweep holds 35 members and 99,000 updates.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import sys, time, torch
sys.path.insert(0, ROOT)
torch.set_num_threads(1)
import dqn_meanexp, dqn_meanexp_sweep as sweep
if not FIXES:
    sweep.release_freed_memory = lambda: None
members = [(float(k), seed) for k in (0, 4) for seed in range(1, 6)]
args = dqn_meanexp.Args(total_timesteps=3000, learning_starts=200, eval_interval=3000, eval_episodes=1)
pop = sweep.Population(args, members, compile=COMPILE)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6
marks, add = [], pop.add
def add_and_measure(*transition):
    add(*transition)
    if pop.pos % 500 == 0:
        marks.append(round(rss()))
pop.add = add_and_measure
started = time.perf_counter()
sweep.train(pop)
print("RESULT", marks, time.perf_counter() - started)
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results here (a new file)")
    args = parser.parse_args()
    if args.json and os.path.exists(args.json):
        sys.exit(f"error: {args.json} exists: choose a new file")
    rows = []
    for compile in (False, True):
        for fixes in (False, True):
            env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
            if fixes:
                env["MALLOC_MMAP_THRESHOLD_"] = str(32 * 2**20)
            code = CHILD.replace("ROOT", repr(ROOT)).replace("FIXES", str(fixes)).replace("COMPILE", str(compile))
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
            marks, seconds = out.split("RESULT ")[1].rsplit(" ", 1)
            row = {"compile": compile, "malloc": "sweep's" if fixes else "default",
                   "rss_mb_every_500_steps": json.loads(marks), "seconds": float(seconds)}
            row["growth_mb_per_1000_updates"] = (row["rss_mb_every_500_steps"][-1] - row["rss_mb_every_500_steps"][0]) / 2.5
            print(f"compile={compile!s:5} malloc={row['malloc']:8}: RSS {row['rss_mb_every_500_steps']} MB, "
                  f"{row['growth_mb_per_1000_updates']:.0f} MB per 1,000 updates, {row['seconds']:.0f} s", flush=True)
            rows.append(row)
    if args.json:
        import torch

        sys.path.insert(0, ROOT)
        from dqn_meanexp_sweep import machine

        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/sweep_memory.py " + " ".join(
                sys.argv[1:]), "machine": machine(),
                "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
