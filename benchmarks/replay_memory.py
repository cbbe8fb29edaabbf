"""Resident memory of a full replay buffer: fills --buffer-size transitions and reads VmRSS.

    python benchmarks/replay_memory.py --buffer-size 1000000 --num-envs 8
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dqn_atari_meanexp import ReplayBuffer  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buffer-size", type=int, default=1_000_000)
    parser.add_argument("--num-envs", type=int, default=8)
    args = parser.parse_args()
    before = rss_bytes()
    rb = ReplayBuffer(args.buffer_size, args.num_envs, torch.device("cpu"))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (args.num_envs, 84, 84), dtype=np.uint8)
    start = time.time()
    for step in range(rb.slots + 1):  # one lap of the ring: every slot written
        first = np.full(args.num_envs, step % 1000 == 0)  # an episode end every 1,000 steps
        rb.add(frames, first, np.zeros(args.num_envs), np.ones(args.num_envs), np.zeros(args.num_envs, bool), np.zeros(args.num_envs, bool))
    filled = time.time() - start
    sample_start = time.time()
    for _ in range(100):
        rb.sample(32)
    result = {
        "buffer_size": args.buffer_size,
        "num_envs": args.num_envs,
        "bytes_needed": ReplayBuffer.bytes_needed(args.buffer_size, args.num_envs),
        "rss_growth_bytes": rss_bytes() - before,
        "rss_total_bytes": rss_bytes(),
        "fill_seconds": round(filled, 2),
        "sample_ms_batch32": round((time.time() - sample_start) * 10, 3),
    }
    print(json.dumps(result, indent=2))
