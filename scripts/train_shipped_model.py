"""Train the shipped IOI GPT-2 (deterministic, CPU) and save it in HF format inside the package.

python scripts/train_shipped_model.py [--steps 4000] [--out tl_patching/assets/ioi-gpt2]
"""

import argparse
import json
from dataclasses import fields
from pathlib import Path

import torch

from tl_patching.checkpoints import SHIPPED_MODEL_DIR
from tl_patching.recipe.training import TrainConfig, train

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--out", type=Path, default=SHIPPED_MODEL_DIR)
    parser.add_argument("--threads", type=int, default=2)
    args = vars(parser.parse_args())
    torch.set_num_threads(args.pop("threads"))
    out = args.pop("out")
    results = train(TrainConfig(**args), out, log=lambda line: print(line, flush=True))
    print(json.dumps({k: v for k, v in results.items() if k != "held_out_pairs"}, indent=1))
