"""Tests of the harness's pure parts: no sockets, no processes, milliseconds to run.

    python -m pytest bench/test_bench.py -q
"""

from __future__ import annotations

import json
import random

import pytest

from bench import report
from bench.latency import Histogram, bucket_of, bucket_value, merged
from bench.loadgen import frame_type, parse_stamp, say_frame, text_pad
from bench.run import PROFILES, parse_args, summarize


def test_buckets_are_monotonic_contiguous_and_within_two_percent() -> None:
    previous = -1
    for us in list(range(5000)) + [random.randrange(5000, 1 << 34) for _ in range(5000)]:
        index = bucket_of(us)
        if us < 5000:
            assert index - previous in (0, 1)
            previous = index
        assert abs(bucket_value(index) - us) <= max(0.5, us * 0.016)


def test_negative_latency_counts_as_zero() -> None:
    assert bucket_of(-5) == 0


def test_percentiles_match_sorted_samples_and_merge_across_workers() -> None:
    rng = random.Random(1)
    samples = [int(rng.expovariate(1 / 5000) * 1000) for _ in range(20000)]
    a, b = Histogram(), Histogram()
    a.add_many_ns(samples[:7000])
    b.add_many_ns(samples[7000:])
    hist = merged([json.loads(json.dumps(a.to_sparse())), b.to_sparse()])
    ordered = sorted(samples)
    assert hist.n == len(samples)
    for pct in (50, 99):
        exact = ordered[int(len(ordered) * pct / 100) - 1] / 1000
        assert hist.percentile_us(pct) == pytest.approx(exact, rel=0.02, abs=1)


def test_empty_histogram_has_no_percentile() -> None:
    assert Histogram().percentile_us(99) is None


@pytest.mark.parametrize("payload, kind", [
    (b'{"type":"message","room":"r0"}', b"message"),
    (b'{"type": "ack", "cid": "x"}', b"ack"),
    (b'{"room":"r0","type":"presence"}', b"presence"),
    (b'{"no":"type"}', b""),
    (b'{"type"', b""),
])
def test_frame_type_reads_compact_and_spaced_json(payload: bytes, kind: bytes) -> None:
    assert frame_type(payload) == kind


def test_say_frame_round_trips_through_a_server_message() -> None:
    frame = say_frame(b"r3", b"0007-12-1", b"0007", text_pad(100))
    said = json.loads(frame)
    assert said["type"] == "say" and said["room"] == "r3" and said["cid"] == "0007-12-1"
    assert len(said["text"]) == 100
    # a server re-encodes the text inside its own message, possibly with spaces
    echoed = json.dumps({"type": "message", "room": "r3", "seq": 9, "text": said["text"]}).encode()
    stamp = parse_stamp(echoed)
    assert stamp is not None
    assert stamp[1] == b"0007"
    assert stamp[0] == int(said["text"][2:21])


def test_parse_stamp_ignores_texts_without_one() -> None:
    assert parse_stamp(b'{"type":"message","text":"hello"}') is None
    assert parse_stamp(b'{"type":"message","text":"t=notanumber.0001 "}') is None


def run_result(**over: object) -> dict:
    base = {"published": 10, "acks": 10, "expected": 1000, "delivered": 1000, "rate": 5000.0,
            "us_per_msg": 20.0, "p50_ms": 1.0, "p99_ms": 3.0, "lost": 0, "dup": 0, "errors": 0,
            "error_text": "", "disconnects": 0, "close_codes": {}, "stale": 0, "srv_cpu_pct": 50.0,
            "lg_cpu_pct": 20.0, "other_srv_core_pct": 1.0, "other_lg_core_pct": 2.0, "inflight": None}
    base.update(over)
    return base


def test_summarize_takes_medians_of_rates_and_sums_of_counts() -> None:
    out = summarize([run_result(rate=1.0, lost=1), run_result(rate=3.0), run_result(rate=2.0, lost=2)])
    assert out["rate"] == 2.0 and out["lost"] == 3 and out["reps"] == 3


def fake_results(ours_cpu: float, ours_rate: float, idle_kib: float) -> report.Results:
    fan = {"tornado": dict(summarize([run_result(us_per_msg=40.0)]), conns=10000, rooms=1, offered=10000),
           "ws-broadcast": dict(summarize([run_result(rate=50000.0)]), conns=10000, rooms=1, offered=10000),
           "server": dict(summarize([run_result(us_per_msg=ours_cpu, rate=ours_rate)]), conns=10000,
                          rooms=1, offered=10000)}
    slow_run = dict(run_result(p99_ms=3.3), conns=20, stalled=4, control=run_result(p99_ms=3.0),
                    growth=3 << 20, bound=4 << 20, write_cap=1 << 20, p99_ratio=1.1, stalled_closed=4,
                    stalled_close_codes={"1013": 4})
    return {
        "fanout": fan,
        "throughput": {k: dict(v) for k, v in fan.items()},
        "idle": {"server": {"conns": 10000, "rss_before": 30 << 20, "rss_after": 200 << 20,
                            "kib_per_conn": idle_kib},
                 "tornado": {"error": "not available: server.py does not exist yet"}},
        "slow": {"server": slow_run},
    }


def test_targets_report_met_and_not_met_from_ratios() -> None:
    lines = report.targets(fake_results(ours_cpu=10.0, ours_rate=60000.0, idle_kib=12.0))
    text = "\n".join(lines)
    assert "CPU/msg vs tornado write_message (fanout): 0.25x  target <=0.5x  MET" in text
    assert "(throughput): 1.20x" in text and "NOT MET" not in text
    lines = report.targets(fake_results(ours_cpu=30.0, ours_rate=40000.0, idle_kib=20.0))
    assert sum("NOT MET" in line for line in lines) == 3


def test_targets_say_why_when_the_server_is_missing() -> None:
    results = {"fanout": {"tornado": summarize([run_result()]),
                          "server": {"error": "not available: server.py does not exist yet"}}}
    line = report.targets(results)[0]
    assert "n/a (not available: server.py does not exist yet)" in line


def test_render_writes_every_selected_table() -> None:
    args = parse_args(["--quick"])
    meta = {"command": "python bench/run.py --quick", "date": "today", "mode": "quick", "elapsed_s": 1,
            "machine": {"cpu": "cpu", "cores": 2, "memory_gib": 24, "kernel": "k", "somaxconn": "4096",
                        "versions": {k: "1" for k in ("python", "tornado", "websockets", "picows", "uvloop")},
                        "loadavg_start": (0.1, 0.1, 0.1)},
            "profile": vars(PROFILES["quick"]), "pinning": {"server": [0], "loadgen": [1]}, "workers": 1,
            "concurrency": 100, "client": "picows + uvloop",
            "servers": {n: {"label": n, "note": "a note"} for n in args.servers}}
    text = report.render(meta, fake_results(10.0, 60000.0, 12.0), args.scenarios, args.servers)
    for heading in ("## Targets", "(`fanout`)", "(`throughput`)", "(`idle`)", "(`slow`)", "## Notes"):
        assert heading in text
    assert "not available: server.py does not exist yet" in text


def test_parse_args_rejects_unknown_names() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--servers", "nginx"])
    with pytest.raises(SystemExit):
        parse_args(["--scenarios", "everything"])
