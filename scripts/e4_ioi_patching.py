"""E4: run on a model by name or directory; see `tl-patching e4 --help` for its settings.

python scripts/e4_ioi_patching.py --model shipped
"""

import sys

from tl_patching.cli import main

if __name__ == "__main__":
    main(["e4", *sys.argv[1:]])
