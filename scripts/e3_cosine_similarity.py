"""E3: run on a model by name or directory; see `tl-patching e3 --help` for its settings.

python scripts/e3_cosine_similarity.py --model shipped
"""

import sys

from tl_patching.cli import main

if __name__ == "__main__":
    main(["e3", *sys.argv[1:]])
