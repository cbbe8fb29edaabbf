"""Milliseconds per fused Adam step on dqn_meanexp.py's network when Adam's running averages are denormal numbers
(below 1e-38: what the averages of a unit that stopped getting gradients decay into), with and without
torch.set_flush_denormal(True), which dqn_meanexp.main and the sweep's workers set.

    python benchmarks/denormal_adam.py
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dqn_meanexp  # noqa: E402


def ms_per_step(flush: bool, denormal: bool, steps: int = 200) -> float:
    torch.set_flush_denormal(False)  # the state is written as it is, then stepped under the setting measured
    torch.manual_seed(0)
    net = dqn_meanexp.QNetwork(8, 4, 4.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, eps=3.125e-4, fused=True)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for p in net.parameters():
        p.grad.zero_()  # a dead unit: no gradient, the averages only decay
        if denormal:
            opt.state[p]["exp_avg"].fill_(1e-40)
            opt.state[p]["exp_avg_sq"].fill_(1e-40)
    torch.set_flush_denormal(flush)
    for _ in range(5):
        opt.step()
    if denormal and not flush:
        assert 0 < float(opt.state[p]["exp_avg_sq"].abs().max()) < 1.2e-38, "the averages did not stay denormal"
    started = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return 1e3 * (time.perf_counter() - started) / steps


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="timed Adam steps per setting (default 200)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {sum(p.numel() for p in dqn_meanexp.QNetwork(8, 4, 4.0).parameters()):,} "
          "parameters")
    for denormal in (False, True):
        for flush in (False, True):
            print(f"averages {'denormal (1e-40)' if denormal else 'normal':16} flush_denormal={flush!s:5}: "
                  f"{ms_per_step(flush, denormal, args.steps):.3f} ms per Adam step", flush=True)
