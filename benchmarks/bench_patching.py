"""Benchmark the head-sweep implementations side by side (GPT-2-small- and -large-sized random models).

    python scripts/bench_patching.py [--sizes gpt2-small-sized,gpt2-large-sized] [--large-sample 60]

Prints a table per size and, last, one line per size:
``gpt2-small-sized final-token head sweep: 23.4x vs plain loop, max abs diff 3e-06``.
"""

import argparse
import sys

import torch

from harness import SIZES, bench_size, report

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pos", type=int, default=16)
    parser.add_argument("--large-sample", type=int, default=60, help="heads the plain loop and TL's sweep time on the large model")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {
        name: bench_size(name, args.batch, args.pos, sample_heads=args.large_sample if "large" in name else None, log=lambda s: print(s, file=sys.stderr))
        for name in args.sizes.split(",")
    }
    print(report(results))
