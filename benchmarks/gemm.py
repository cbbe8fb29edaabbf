"""The machine's matrix-multiply rate: the floor against which the LunarLander sweep's time is measured (each part
measures it before and after itself, with dqn_meanexp_sweep.gemm_gflops).

    python benchmarks/gemm.py            # GFLOP/s of a 2048 x 2048 float32 matmul on all of torch's threads
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dqn_meanexp_sweep import gemm_gflops  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="n of the n x n float32 matrices (default 2048)")
    parser.add_argument("--repeats", type=int, default=10, help="timed products; the best counts (default 10)")
    args = parser.parse_args()
    print(f"{gemm_gflops(args.size, args.repeats):.1f} GFLOP/s ({torch.get_num_threads()} threads, torch {torch.__version__})")
