"""Milliseconds per Adam step on the DQN network's parameters: PyTorch's loop over parameters vs fused=True.

    python benchmarks/adam_step.py
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dqn_atari_meanexp as dqn  # noqa: E402

net = dqn.QNetwork(18, 18.0)
for p in net.parameters(): p.grad = torch.randn_like(p)
for fused in (False, True):
    opt = torch.optim.Adam(net.parameters(), lr=6.25e-5, eps=1.5e-4, fused=fused)
    for _ in range(5): opt.step()
    t = time.perf_counter(); n = 200
    for _ in range(n): opt.step()
    print(f"fused={fused}: {1e3 * (time.perf_counter() - t) / n:.2f} ms per Adam step ({sum(p.numel() for p in net.parameters()):,} parameters)")
