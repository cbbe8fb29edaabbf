"""A MinAtar run against its bound, in one process and one run (issue 36 item 5).

    OMP_NUM_THREADS=1 python benchmarks/minatar_bound.py --json benchmarks/results/DATE_cpu-2core_minatar_bound.json
    python benchmarks/minatar_bound.py --steps 3000          # a quick look (the tests run this)

It runs dqn_minatar_meanexp.py's own main() here, with its default protocol (epsilon held at its final 0.01 from the
start: the rate of the bulk of a run; no periodic evaluation), and times, inside that run, every call of the parts a run
cannot do without: each update (the replay sample and the gradient step: update()), each action choice (act()) and each
env step (the vector env's step()). The bound is their sum, from the first update to the last: the time a run would take
if the loop did nothing else. The share is bound / the loop's wall time over the same span; what is left is the loop's
own work (the replay buffer's add, target syncs with their action-gap statistic, logging, the progress line).
"""

import argparse
import functools
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dqn_minatar_meanexp as script  # noqa: E402
from longrun import machine  # noqa: E402  (the CPU's model for the result)

PARTS = ("update", "sample", "act", "env")  # the sample is drawn before update() is called (its argument)


def timing(clock: dict, part: str, fn):
    """fn, whose calls from the first update on add their seconds to clock[part]; updates stamp the span's ends."""
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        end = time.perf_counter()
        if part == "update":
            clock["first"] = clock["first"] or start
            clock["last"], clock["updates"] = end, clock["updates"] + 1
        if clock["first"]:  # from the first update on: the span the share is measured over
            clock[part] += end - start
            clock[f"{part}_calls"] += 1
        return result
    return timed


def measure(env_id: str, steps: int, learning_starts: int) -> dict:
    clock = dict.fromkeys(PARTS, 0.0) | dict.fromkeys((f"{p}_calls" for p in PARTS), 0) | {"first": 0.0, "last": 0.0,
                                                                                         "updates": 0}
    make_envs, act, update, sample = script.make_train_envs, script.act, script.update, script.ReplayBuffer.sample

    def make_timed_envs(args, run_dir):
        envs = make_envs(args, run_dir)
        envs.step = timing(clock, "env", envs.step)
        return envs

    script.make_train_envs, script.act = make_timed_envs, timing(clock, "act", act)
    script.update, script.ReplayBuffer.sample = timing(clock, "update", update), timing(clock, "sample", sample)
    flags = ["--env-id", env_id, "--no-cuda", "--run-name", "bench", "--total-timesteps", str(learning_starts + steps),
             "--learning-starts", str(learning_starts), "--eval-interval", "0", "--final-eval-episodes", "1",
             "--checkpoint-interval", "0", "--no-checkpoint-buffer", "--start-e", "0.01", "--end-e", "0.01"]
    with tempfile.TemporaryDirectory() as cwd:
        here = os.getcwd()
        os.chdir(cwd)
        try:
            script.main(script.parse_args(flags))
        finally:
            os.chdir(here)
            script.make_train_envs, script.act, script.update, script.ReplayBuffer.sample = make_envs, act, update, sample
    wall = clock["last"] - clock["first"]
    # the first update's sample was drawn before the span began; every later one inside it counts as update time
    update_seconds = clock["update"] + clock["sample"]
    bound = update_seconds + clock["act"] + clock["env"]
    return {"env_id": env_id, "steps": steps, "learning_starts": learning_starts, "updates": clock["updates"],
            "loop_seconds": wall, "bound_seconds": bound, "share_of_bound": bound / wall,
            "update_ms": 1e3 * update_seconds / max(1, clock["update_calls"]),
            "act_us": 1e6 * clock["act"] / max(1, clock["act_calls"]),
            "env_us": 1e6 * clock["env"] / max(1, clock["env_calls"]),
            "act_calls": clock["act_calls"], "env_calls": clock["env_calls"],
            "seconds_per_part": {"update": update_seconds, "act": clock["act"], "env": clock["env"],
                                 "rest_of_loop": wall - bound},
            "sps": steps / wall}  # agent steps: env_calls also counts the autoreset steps between episodes


def markdown(rows: list) -> list:
    """The table of benchmarks/README.md, one line per measured game (a test holds the README to the committed JSON)."""
    lines = ["| game | steps/s | update ms | act us | env us | bound (s) | loop (s) | share of the bound |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    return lines + [f"| {r['env_id'].split('/')[1].split('-')[0]} | {r['sps']:,.0f} | {r['update_ms']:.2f} | {r['act_us']:.0f} | "
                    f"{r['env_us']:.0f} | {r['bound_seconds']:.1f} | {r['loop_seconds']:.1f} | {r['share_of_bound']:.3f} |"
                    for r in rows]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-ids", nargs="+", default=["MinAtar/Breakout-v1"])
    parser.add_argument("--steps", type=int, default=60_000, help="agent steps after learning starts (default 60,000)")
    parser.add_argument("--learning-starts", type=int, default=1_000)
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON here (a new file)")
    args = parser.parse_args()
    if args.steps < 100 or args.learning_starts < 100:
        parser.error(f"--steps and --learning-starts must be >= 100 (got {args.steps}, {args.learning_starts})")
    if args.json is not None and os.path.exists(args.json):  # before minutes of measuring, not after
        parser.error(f"--json {args.json} exists: choose a new file (nothing was overwritten)")
    rows = []
    for env_id in args.env_ids:
        row = measure(env_id, args.steps, args.learning_starts)
        rows.append(row)
        print(f"{env_id}: {row['sps']:,.0f} steps/s; update {row['update_ms']:.3f} ms x {row['updates']:,}, act "
              f"{row['act_us']:.1f} us and env {row['env_us']:.1f} us x {row['env_calls']:,}: bound "
              f"{row['bound_seconds']:.1f} s of the loop's {row['loop_seconds']:.1f} s, share {row['share_of_bound']:.3f}")
    print("\n".join(markdown(rows)))
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
