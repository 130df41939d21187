"""A bounded Autobahn TestSuite run against /ws/echo on every CI run.

`kosoku` (PyPI) drives the Autobahn case files in fuzzingclient mode.  This
runs sections 1-7 and 10 (framing, pings, reserved bits, opcodes,
fragmentation, UTF-8, closing, auto-fragmentation: about 250 cases, a few
seconds) with compression off and on, plus a handful of the compression cases
(12.x, 13.x) with it on.  The full suite, sizes up to 16 MiB and every
compression case, is ``python scripts/autobahn.py`` (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import shutil
import sys

import pytest

CORE = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "10.*"]
COMPRESSION = ["12.1.1", "12.1.2", "12.1.3", "12.2.1", "12.4.2", "12.5.3", "13.1.1", "13.2.2", "13.3.1",
               "13.3.3", "13.4.1", "13.5.2", "13.6.1", "13.7.1", "13.7.3"]
OPTIONS = {"rate_limit": 0, "max_message_size": 1 << 20}


def kosoku() -> str:
    path = shutil.which("kosoku") or os.path.join(os.path.dirname(sys.executable), "kosoku")
    if not os.path.exists(path):
        pytest.skip("kosoku is not installed (pip install -e '.[test]')")  # a failure under CI
    return path


async def run_cases(port: int, cases: list[str], outdir: str) -> dict[str, dict]:
    args = [kosoku(), "ws://127.0.0.1:%d/ws/echo" % port, "-p", "4", "-o", outdir]
    for case in cases:
        args += ["-i", case]
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    with open(os.path.join(outdir, "index.json")) as f:
        (results,) = json.load(f).values()
    assert results, out.decode(errors="replace")
    return results


def verdicts(results: dict[str, dict]) -> collections.Counter:
    return collections.Counter(r["behavior"] for r in results.values())


@pytest.mark.gen_test(timeout=150)
@pytest.mark.parametrize("app_options", [OPTIONS, {**OPTIONS, "websocket_compression": True}])
async def test_autobahn_core_cases_pass(http_server, http_port, app_options, tmp_path):
    results = await run_cases(http_port, CORE, str(tmp_path / "reports"))
    failed = {cid: (r["behavior"], r["behaviorClose"]) for cid, r in results.items()
              if r["behavior"] in ("FAILED", "ERROR") or r["behaviorClose"] in ("FAILED", "WRONG CODE", "UNCLEAN")}
    assert failed == {}
    assert len(results) > 240
    # The cases Tornado alone fails: invalid close codes must be answered with 1002.
    assert all(results["7.9.%d" % i]["behavior"] == "OK" for i in range(1, 10))
    assert verdicts(results)["OK"] >= len(results) - 5  # NON-STRICT only for UTF-8 sent in chops (6.4.3/4)


@pytest.mark.gen_test(timeout=150)
@pytest.mark.parametrize("app_options", [{**OPTIONS, "websocket_compression": True}])
async def test_autobahn_compression_cases_pass(http_server, http_port, app_options, tmp_path):
    results = await run_cases(http_port, COMPRESSION, str(tmp_path / "reports"))
    assert set(results) == set(COMPRESSION)
    assert {cid: r["behavior"] for cid, r in results.items() if r["behavior"] != "OK"} == {}


@pytest.mark.gen_test(timeout=150)
@pytest.mark.parametrize("app_options", [OPTIONS])
async def test_without_compression_the_compression_cases_are_unimplemented_not_failed(
        http_server, http_port, app_options, tmp_path):
    results = await run_cases(http_port, ["12.1.1", "13.1.1"], str(tmp_path / "reports"))
    assert verdicts(results) == {"UNIMPLEMENTED": 2}
