"""conf/nginx.conf.example keeps the shape tests/cluster/nginx.py runs (no nginx needed here)."""

from __future__ import annotations

import pytest

from tests.cluster.nginx import EXAMPLE, site_config


def example() -> str:
    with open(EXAMPLE) as f:
        return f.read()


def test_the_test_configuration_is_the_example_with_only_ports_paths_and_certificate_changed() -> None:
    text = site_config(example(), port=18443, upstreams=[9001, 9002, 9003], cert="/p/cert.pem", key="/p/key.pem",
                       logs="/p/logs")
    assert "listen 127.0.0.1:18443 ssl;" in text
    assert text.count("max_fails=1 fail_timeout=5s;") == 3 and "127.0.0.1:8888" not in text
    assert "ssl_certificate /p/cert.pem;" in text and "ssl_certificate_key /p/key.pem;" in text
    assert "access_log /p/logs/realtime.log realtime_noquery;" in text
    changed = {line.strip() for line in text.splitlines()} - {line.strip() for line in example().splitlines()}
    assert all(("127.0.0.1:" in line) or ("/p/" in line) for line in changed), changed


def test_the_example_passes_the_port_upgrades_and_fails_over() -> None:
    text = example()
    # The server compares Origin with Host, port included: $host would drop it.
    assert "proxy_set_header Host $http_host;" in text and "Host $host;" not in text
    assert "proxy_set_header Connection $connection_upgrade;" in text
    assert "proxy_next_upstream error timeout http_502 http_503;" in text
    assert "log_format realtime_noquery" in text and "$request_uri" not in text


def test_a_changed_example_is_refused_rather_than_half_substituted() -> None:
    with pytest.raises(AssertionError, match="changed shape"):
        site_config(example().replace("listen 443 ssl;", "listen 8443;"), port=1, upstreams=[2], cert="c",
                    key="k", logs="l")
