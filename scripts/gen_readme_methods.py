"""Rewrite the method table in README.md from the method registry.

python scripts/gen_readme_methods.py          # rewrite README.md
python scripts/gen_readme_methods.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's registry, not whichever merge is installed

from merge.methods.docs import replace_table  # noqa: E402

README = ROOT / "README.md"


def main(argv: list[str]) -> int:
    text = README.read_text(encoding="utf-8")
    new = replace_table(text)
    if "--check" in argv:
        if new != text:
            print("README.md method table is out of date: run scripts/gen_readme_methods.py")
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
