"""conf/ and the README document every option, with the real defaults; links in the tree resolve."""

import ast
import glob
import os

import pytest
from tornado.options import options

import server  # (defines the options)

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


def test_the_parsed_command_line_and_config_file_become_a_typed_config(tmp_path):
    """tornado.options parses (the command line wins over the file); realtime.config.Config holds the result."""
    from tornado.options import OptionParser

    from realtime.config import Config, define_options

    conf = tmp_path / "x.conf"
    conf.write_text("max_text = 500\nallowed_origins = ['https://a.example, https://b.example']\nport = 1\n")
    parser = OptionParser()
    define_options(parser)
    parser.parse_config_file(str(conf), final=False)
    parser.parse_command_line(["server.py", "--port=9000", "--rate_limit=2.5", "--fast_path=false"], final=False)
    cfg = Config.from_options(parser.as_dict())
    assert (cfg.max_text, cfg.port, cfg.rate_limit, cfg.fast_path) == (500, 9000, 2.5, False)
    assert cfg.allowed_origins == ["https://a.example", "https://b.example"]
    assert Config.from_options(OptionParser().as_dict()) == Config()  # nothing parsed: the defaults
    assert cfg.replace(max_text=10).max_text == 10
    with pytest.raises(TypeError, match="no_such_option"):
        cfg.replace(no_such_option=1)


def test_links_to_files_in_the_tree_resolve():
    """A doc that was merged or renamed leaves no dangling link: relative Markdown links, and
    mentions of docs/*.md anywhere in the tree, name files that exist."""
    import re
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    dangling = []
    for name in files:
        if not name.endswith((".md", ".py", ".js", ".html", ".conf", ".example", ".cfg", ".toml", ".sh")):
            continue
        with open(os.path.join(ROOT, name), encoding="utf-8", errors="replace") as f:
            text = f.read()
        targets = re.findall(r"\bdocs/[\w.-]+\.md\b", text)
        if name.endswith(".md"):
            targets += [os.path.join(os.path.dirname(name), t)
                        for t in re.findall(r"\]\(([^)#\s:]+\.[a-z]+)(?:#[^)]*)?\)", text)]
        dangling += ["%s -> %s" % (name, t) for t in targets
                     if not os.path.exists(os.path.join(ROOT, os.path.normpath(t)))]
    assert not dangling, dangling


def test_the_cycle_collector_is_tuned_for_many_connections_and_can_be_left_alone():
    import gc

    before = gc.get_threshold()
    try:
        server.tune_gc(0)
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0
        server.tune_gc(12345)
        assert gc.get_threshold() == (12345, 20, 20)
        assert gc.get_freeze_count() > 0  # startup's objects are not scanned again
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
