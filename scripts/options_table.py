"""Print every server option as a markdown table (for the README).

    python scripts/options_table.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tornado.options import options  # noqa: E402

import server  # noqa: E402,F401  (defines the options)

SKIP = {"help", "logging", "log_to_stderr", "log_file_prefix", "log_file_max_size",
        "log_file_num_backups", "log_rotate_when", "log_rotate_interval", "log_rotate_mode"}


def main() -> None:
    groups: dict[str, list[str]] = {}
    for opt in sorted(options._options.values(), key=lambda o: (o.file_name, o.name)):
        if opt.name in SKIP:
            continue
        module = os.path.basename(opt.file_name)
        default = opt.default
        if isinstance(default, str) and "\n" in default:
            default = "(see conf/)"
        row = "| `%s` | `%r` | %s |" % (opt.name, default, (opt.help or "").replace("|", "\\|"))
        groups.setdefault(module, []).append(row)
    for module, rows in groups.items():
        print("\n**%s**\n" % module)
        print("| option | default | meaning |")
        print("|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
