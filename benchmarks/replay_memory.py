"""Resident memory of a full replay buffer: fills --buffer-size transitions and reads VmRSS.
With --checkpoint PATH, also times writing the buffer as a checkpoint does and loading it back.

    python benchmarks/replay_memory.py --buffer-size 1000000 --num-envs 8
    python benchmarks/replay_memory.py --buffer-size 1000000 --num-envs 8 --checkpoint /tmp/replay.pt
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
from dqn_meanexp_sweep import machine  # noqa: E402  (the CPU's model for the result)
from longrun import atomic_save  # noqa: E402


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
    parser.add_argument("--checkpoint", default=None, help="a file to write the buffer to and read it back from (deleted after)")
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
        "machine": machine(),
        "buffer_size": args.buffer_size,
        "num_envs": args.num_envs,
        "bytes_needed": ReplayBuffer.bytes_needed(args.buffer_size, args.num_envs),
        "rss_growth_bytes": rss_bytes() - before,
        "rss_total_bytes": rss_bytes(),
        "fill_seconds": round(filled, 2),
        "sample_ms_batch32": round((time.time() - sample_start) * 10, 3),
    }
    if args.checkpoint:
        start = time.time()
        atomic_save(args.checkpoint, lambda tmp: torch.save({"replay": rb.state_dict()}, tmp))  # as the scripts do
        result["checkpoint_write_seconds"] = round(time.time() - start, 1)
        result["checkpoint_bytes"] = os.path.getsize(args.checkpoint)
        result["rss_after_write_bytes"] = rss_bytes()
        start = time.time()
        copy = ReplayBuffer(args.buffer_size, args.num_envs, torch.device("cpu"))
        copy.load_state_dict(torch.load(args.checkpoint, weights_only=False, mmap=True)["replay"])
        result["checkpoint_load_seconds"] = round(time.time() - start, 1)
        result["rss_after_load_bytes"] = rss_bytes()  # both buffers: the loaded one is a copy, not the file's mapping
        result["loaded_equal"] = bool(np.array_equal(copy.frames, rb.frames) and np.array_equal(copy.valid, rb.valid))
        os.remove(args.checkpoint)
    print(json.dumps(result, indent=2))
