"""Measure the main job and the shipped model's IOI structure against issue targets; prints them.

    python scripts/check_main_job.py            # runs `tl-patching reproduce` in a child process

Targets: main job < 5 minutes and < 4 GB peak memory on this machine; on the shipped model, patching
resid_post (at the repeated name or the final position) at a middle layer flips the sign of the mean logit difference,
and at least one single head at the final position moves it by more than 10%.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="figures folder (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp())
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tl_patching.cli", "reproduce", "--out", str(out)], check=True)
    wall = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
    e4 = json.loads((out / "shipped" / "e4_result.json").read_text())
    e5 = json.loads((out / "shipped" / "e5_result.json").read_text())
    s2 = [s["mean"] for s in e4["resid_s2_summary"]]
    final = [s["mean"] for s in e4["resid_final_summary"]]
    n_layers = len(s2)
    middle = (n_layers // 2 - 1, n_layers // 2)
    clean = e4["clean_summary"]["mean"]
    effect = e5["effect"]["__tensor__"]
    heat = [[sum(p) / len(p) for p in head] for head in effect]
    biggest = max(abs(v) for row in heat for v in row)
    print(f"main job: {wall:.0f} s (target < 300 s), peak memory {peak_gb:.2f} GB (target < 4 GB)")
    for label, curve in (("at S2", s2), ("at the final position", final)):
        print(
            f"E4: clean mean logit diff {clean:.2f}; resid_post patched {label}, mean per layer: "
            + ", ".join(f"L{l} {v:+.2f}" for l, v in enumerate(curve))
            + f" -> sign flipped at middle layer(s) {[l for l in middle if curve[l] < 0]}"
        )
    print(
        f"E5: largest single-head final-position effect {biggest:.2f} nats = {biggest / clean:.0%} "
        "of the clean logit diff (target > 10%)"
    )
