"""Rewrite the options table in README.md from realtime/config.py (scripts/options_table.py).

    python scripts/update_readme.py
"""

import contextlib
import io
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import options_table  # noqa: E402

README = os.path.join(os.path.dirname(HERE), "README.md")


def main() -> None:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        options_table.main()
    with open(README) as f:
        text = f.read()
    text = re.sub(r"<!-- options -->.*<!-- /options -->",
                  lambda _m: "<!-- options -->\n" + buf.getvalue().strip() + "\n<!-- /options -->",
                  text, flags=re.S)
    with open(README, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
