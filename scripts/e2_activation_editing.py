"""E2: run on a model by name or directory; see `tl-patching e2 --help` for its settings.

python scripts/e2_activation_editing.py --model shipped
"""

import sys

from tl_patching.cli import main

if __name__ == "__main__":
    main(["e2", *sys.argv[1:]])
