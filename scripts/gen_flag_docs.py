"""Write docs/flags.md from `sera_openrlhf/config.py` (tests/test_docs.py fails when it is stale).

    python scripts/gen_flag_docs.py          # rewrite docs/flags.md
    python scripts/gen_flag_docs.py --check  # exit 1 if docs/flags.md differs
"""

import os
import sys

from sera_openrlhf.cli.flags import flags_markdown

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "flags.md")

if __name__ == "__main__":
    text = flags_markdown()
    if "--check" in sys.argv:
        current = open(PATH, encoding="utf-8").read() if os.path.exists(PATH) else ""
        sys.exit(0 if current == text else 1)
    with open(PATH, "w", encoding="utf-8") as f:
        f.write(text)
    print(PATH)
