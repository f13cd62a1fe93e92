"""E5: run on a model by name or directory; see `tl-patching e5 --help` for its settings.

python scripts/e5_head_token_patching.py --model shipped
"""

import sys

from tl_patching.cli import main

if __name__ == "__main__":
    main(["e5", *sys.argv[1:]])
