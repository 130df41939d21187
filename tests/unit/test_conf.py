"""conf/ and the README document every option, with the real defaults."""

import ast
import glob
import os

from tornado.options import options

import server  # noqa: F401  (defines the options)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORNADO_OWN = {"help", "logging", "log_to_stderr", "log_file_prefix", "log_file_max_size",
               "log_file_num_backups", "log_rotate_when", "log_rotate_interval", "log_rotate_mode",
               "config"}  # a config file does not name itself


def conf_values(path):
    values = {}
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        assert isinstance(node, ast.Assign), ast.dump(node)
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def all_conf_names():
    names = set()
    for path in glob.glob(os.path.join(ROOT, "conf", "*.conf*")):
        if os.path.basename(path).startswith("nginx"):
            continue
        names |= set(conf_values(path))
    return names


def test_default_conf_matches_the_built_in_defaults():
    values = conf_values(os.path.join(ROOT, "conf", "default.conf"))
    for name, value in values.items():
        opt = options._options[name.replace("_", "-")]
        assert opt.default == value or (opt.multiple and list(opt.default or []) == value), name


def test_every_option_is_documented_in_conf_and_readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    documented = all_conf_names()
    for name in options.as_dict():
        if name in TORNADO_OWN:
            continue
        assert name in documented, "option %s missing from conf/" % name
        assert "`%s`" % name in readme, "option %s missing from README" % name


def test_every_conf_name_is_a_real_option():
    names = set(options.as_dict())
    for name in all_conf_names():
        assert name in names, "conf/ mentions unknown option %s" % name
