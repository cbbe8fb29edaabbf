"""Milliseconds per Adam step on the DQN network's parameters: PyTorch's loop over parameters vs fused=True.

    python benchmarks/adam_step.py
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dqn_atari_meanexp as dqn  # noqa: E402


def ms_per_step(fused: bool, steps: int) -> float:
    net = dqn.QNetwork(18, 18.0)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(net.parameters(), lr=6.25e-5, eps=1.5e-4, fused=fused)
    for _ in range(5):  # warm-up: the first steps create the optimizer's state
        opt.step()
    started = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return 1e3 * (time.perf_counter() - started) / steps


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="timed Adam steps per setting (default 200)")
    args = parser.parse_args()
    parameters = sum(p.numel() for p in dqn.QNetwork(18, 18.0).parameters())
    for fused in (False, True):
        print(f"fused={fused}: {ms_per_step(fused, args.steps):.2f} ms per Adam step ({parameters:,} parameters)")
