"""The machine's matrix-multiply rate: the floor against which the LunarLander sweep's time is measured.

    python benchmarks/gemm.py            # GFLOP/s of a 2048 x 2048 float32 matmul on all of torch's threads
"""

import time

import torch


def gemm_gflops(n: int = 2048, repeats: int = 10) -> float:
    """The best rate of `repeats` n x n float32 matrix products (2 n^3 FLOP each), after one to warm up."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


if __name__ == "__main__":
    print(f"{gemm_gflops():.1f} GFLOP/s ({torch.get_num_threads()} threads, torch {torch.__version__})")
