"""The sweep's gradients two ways, both compiled as the sweep compiles its update, at the sweep's shapes (batch 128,
LunarLander's 8 inputs and 4 actions), on one thread as a sweep worker runs: torch.func's (dqn_meanexp_sweep.gradients:
vmap over the members of grad of dqn_meanexp.td_loss itself), which the sweep uses since issue 32, and the chain rule
written out by hand as batched products (hand_gradients below: the sweep's own until then). Issue 32 let the
hand-written copy of td_loss's derivative stay only if torch.func cost more than 10% more.

    python benchmarks/sweep_gradients.py --members 5 35 --json benchmarks/results/DATE_sweep_gradients.json
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dqn_meanexp  # noqa: E402
import dqn_meanexp_sweep as sweep  # noqa: E402


def hand_gradients(params: list, target: list, k, obs_divisor: float, gamma: float, batch: tuple) -> tuple:
    """The sweep's gradients until issue 32: td_loss's chain rule written out for every member at once."""
    obs, actions, rewards, next_obs, terminated = batch  # (M, B, ...) each
    with torch.no_grad():
        y = rewards + gamma * (1.0 - terminated) * sweep.forward(target, next_obs, k, obs_divisor)[0].max(dim=2).values
        q, (x, h1, h2) = sweep.forward(params, obs, k, obs_divisor)
        q_taken = q.gather(2, actions[..., None]).squeeze(2)
        dq = torch.zeros_like(q).scatter_(2, actions[..., None], ((q_taken - y) / q.shape[1])[..., None])  # dLoss/dQ
        du = dq + dq.sum(dim=2, keepdim=True) * k / q.shape[2]  # through the head: dQ(a)/du(b) = [a == b] + k/|A|
        dh2 = torch.where(h2 > 0, du @ params[4].transpose(1, 2), 0.0)
        dh1 = torch.where(h1 > 0, dh2 @ params[2].transpose(1, 2), 0.0)
        grads = []
        for inputs, d in ((x, dh1), (h1, dh2), (h2, du)):
            grads += [inputs.transpose(1, 2) @ d, d.sum(dim=1, keepdim=True)]
        return grads, dqn_meanexp.action_gap(q), q_taken


def setup(members: int, seed: int = 0):
    torch.manual_seed(seed)
    nets = [dqn_meanexp.QNetwork(8, 4, 4.0) for _ in range(2 * members)]
    params, target = sweep.stack_networks(nets[:members]), sweep.stack_networks(nets[members:])
    g = torch.Generator().manual_seed(seed)
    batch = (torch.randn(members, 128, 8, generator=g) * 5, torch.randint(0, 4, (members, 128), generator=g),
             torch.randn(members, 128, generator=g), torch.randn(members, 128, 8, generator=g) * 5,
             (torch.rand(members, 128, generator=g) < 0.1).float())
    k = torch.full((members, 1, 1), 4.0)
    return params, target, k, batch


def ms_per_call(fn, args, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return 1e3 * (time.perf_counter() - started) / calls


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, nargs="+", default=[5, 35], help="members of a worker (default 5 35)")
    parser.add_argument("--calls", type=int, default=300, help="timed calls per round (default 300)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, the two in turn; the best counts (default 5)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": sweep.machine(),
               "torch": torch.__version__, "threads": 1, "calls": args.calls, "rounds": args.rounds, "ms_per_call": {}}
    for m in args.members:
        params, target, k, batch = setup(m)
        inputs = (params, target, k, 10.0, 0.99, batch)
        ways = {"hand-derived": torch.compile(hand_gradients, dynamic=False),
                "torch.func": torch.compile(sweep.gradients, dynamic=False)}
        hand, func = ways["hand-derived"](*inputs)[0], ways["torch.func"](*inputs)[0]  # compiles; the same gradients:
        for a, b in zip(hand, func):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * b.abs().max().item())
        best = dict.fromkeys(ways, float("inf"))
        for _ in range(args.rounds):  # in turn, so that a busy machine slows both alike
            for name, fn in ways.items():
                best[name] = min(best[name], ms_per_call(fn, inputs, args.calls))
        results["ms_per_call"][m] = best
        print(f"{m} members: hand-derived {best['hand-derived']:.3f} ms, torch.func {best['torch.func']:.3f} ms per "
              f"update's gradients ({best['torch.func'] / best['hand-derived']:.2f}x)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
