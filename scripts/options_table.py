"""Print every server option as a markdown table (for the README), section by
section in the order realtime/config.py lists them.

    python scripts/options_table.py
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from realtime.config import Config  # noqa: E402


def main() -> None:
    groups: dict[str, list[str]] = {}
    for f in dataclasses.fields(Config):
        factory = f.default_factory
        default = factory() if callable(factory) else f.default
        if isinstance(default, str) and "\n" in default:
            default = "(see conf/)"
        row = "| `%s` | `%r` | %s |" % (f.name, default, f.metadata["help"].replace("|", "\\|"))
        groups.setdefault(f.metadata["section"], []).append(row)
    for section, rows in groups.items():
        print("\n**%s**\n" % (section[0].upper() + section[1:]))
        print("| option | default | meaning |")
        print("|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
