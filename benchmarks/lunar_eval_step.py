"""What one step of the sweep's evaluation costs on one core: a LunarLander-v3 step through dqn_meanexp.make_env's
wrappers, and the sweep's forward of M members at batch 1 (what each lockstep evaluation step runs once).

    python benchmarks/lunar_eval_step.py            # M = 5, the members of one worker in a one-k part
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dqn_meanexp  # noqa: E402
import dqn_meanexp_sweep  # noqa: E402


def us_per_call(fn, calls: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e6 * (time.perf_counter() - started) / calls


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a sweep worker
    env = dqn_meanexp.make_env("LunarLander-v3")
    env.reset(seed=0)
    rng = np.random.default_rng(0)

    def env_step():
        _, _, terminated, truncated, _ = env.step(int(rng.integers(4)))
        if terminated or truncated:
            env.reset()

    pop = dqn_meanexp_sweep.Population(dqn_meanexp.Args(buffer_size=1000), [(4.0, s) for s in range(args.members)], False)
    obs = np.zeros((args.members, pop.obs_size), np.float32)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, one thread, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"LunarLander-v3 step (random actions, make_env's wrappers): {us_per_call(env_step, args.calls):.1f} us")
    print(f"forward of {args.members} members at batch 1 (Population.q_values): "
          f"{us_per_call(lambda: pop.q_values(obs).numpy(), args.calls):.1f} us")
