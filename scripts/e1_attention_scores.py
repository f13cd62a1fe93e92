"""E1: run on a model by name or directory; see `tl-patching e1 --help` for its settings.

python scripts/e1_attention_scores.py --model shipped
"""

import sys

from tl_patching.cli import main

if __name__ == "__main__":
    main(["e1", *sys.argv[1:]])
