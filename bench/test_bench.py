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
from bench.run import PROFILES, app_record, parse_args, summarize


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


def sensors_raw(**over: object) -> dict:
    base = {"viewers": 1000, "connected": 1000, "connect_failures": 0, "first_failure": "", "sensors": 20,
            "hz": 10.0, "duration_s": 10.0, "connect_s": 2.0, "client": "picows + uvloop",
            "batches_per_s": 10000.0, "ideal_batches_per_s": 10000.0, "server_cpu_pct": 30.0,
            "server_cpu_us_per_batch": 30.0, "latency_p50_ms": 2.0, "latency_p99_ms": 8.0, "latency_max_ms": 12.0,
            "loadgen_cpu_pct": 40.0, "other_cpu_pct": 3.0, "other_srv_core_pct": 1.0, "other_lg_core_pct": 2.0,
            "errors": 0, "error_text": "", "closed_early": 0, "pinned": True, "verdict": "PASS"}
    base.update(over)
    return base


def editor_raw(**over: object) -> dict:
    base: dict[str, object] = {"editors": 50, "target_ops_per_s": 1000.0, "duration_s": 10.0, "applied_ops": 10000,
            "applied_ops_per_s": 1000.0, "edits": 10000, "ack_samples": 10000, "ack_p50_ms": 3.0,
            "ack_p99_ms": 6.0, "ack_max_ms": 20.0, "server_cpu_us_per_op": 450.0, "server_cpu_pct": 45.0,
            "loadgen_cpu_pct": 35.0, "other_load_on_server_core_pct": 2.0, "other_load_on_loadgen_core_pct": 30.0,
            "converged": True, "final_rev": 12000, "final_length": 2000, "errors": 0, "first_error": None,
            "disconnects": 0, "client": "picows", "durable": "synchronous=FULL", "passed": True}
    base.update(over)
    return base


def test_app_record_maps_the_scripts_results_to_the_report_keys() -> None:
    r = app_record("sensors", sensors_raw(latency_p99_ms=float("nan")))
    assert r["rate"] == 10000.0 and r["us_per_msg"] == 30.0 and r["srv_cpu_pct"] == 30.0
    assert r["p99_ms"] is None  # NaN (no sample) is no measurement
    e = app_record("editor", editor_raw())
    assert e["rate"] == 1000.0 and e["p99_ms"] == 6.0 and e["other_lg_core_pct"] == 30.0
    with pytest.raises(ValueError):
        app_record("chat", {})


def test_sensors_target_names_each_failed_criterion_and_the_viewer_count() -> None:
    ok = report.sensors_target({"sensors": {"server": app_record("sensors", sensors_raw())}})
    assert ok[0].endswith("MET") and "8.00 ms at 1,000 viewers" in ok[0] and len(ok) == 1
    slow = app_record("sensors", sensors_raw(latency_p99_ms=80.0, batches_per_s=9000.0, server_cpu_pct=97.0))
    lines = report.sensors_target({"sensors": {"server": slow}})
    assert "NOT MET" in lines[0]
    assert lines[1].startswith("  - limit: p99 80.0 ms, 9,000 of 10,000 batches/s delivered; the server's CPU: 97 %")
    quick = app_record("sensors", sensors_raw(viewers=200, connected=200, ideal_batches_per_s=2000.0,
                                              batches_per_s=2000.0))
    line = report.sensors_target({"sensors": {"server": quick}})[0]
    assert "(measured at 200 viewers; the target is for 1,000)" in line


def test_editor_target_needs_rate_p99_convergence_and_durability() -> None:
    line = report.editor_target({"editor": {"server": app_record("editor", editor_raw(applied_ops_per_s=995.0))}})
    assert line[0].endswith("  MET")  # within the window's jitter
    lagging = app_record("editor", editor_raw(applied_ops_per_s=700.0, ack_p99_ms=90.0, converged=False))
    ok, failed = report.editor_check(lagging)
    assert ok is False and failed == ["700 ops/s applied of 1,000 offered", "ack p99 90.0 ms",
                                      "the copies did not converge"]
    lines = report.editor_target({"editor": {"server": lagging}})
    assert "NOT MET" in lines[0] and "edits every 50 ms" in lines[1]
    assert "other processes took 30 % of the load generator's core" in lines[1]
    assert report.editor_check(app_record("editor", editor_raw(durable="synchronous=NORMAL")))[0] is False


def test_rooms_limit_line_gives_the_cost_per_say_and_commits() -> None:
    results = fake_results(10.0, 60000.0, 12.0)
    results["rooms"] = {
        "tornado": dict(summarize([run_result(us_per_msg=50.0)]), conns=10000, rooms=1000, offered=8000),
        "server": dict(summarize([dict(run_result(us_per_msg=60.0, published=4800), commits=4800)]),
                       conns=10000, rooms=1000, offered=8000)}
    lines = report.targets(results)
    at = next(i for i, line in enumerate(lines) if "(rooms): 1.20x" in line)
    assert lines[at].endswith("NOT MET")
    limit = lines[at + 1]
    assert "600 µs of server CPU per say against the Tornado demo's 500" in limit
    assert "at 800 says/s each say had a commit of its own (1.0 says per commit)" in limit
    assert "in the one big room" in limit and "0.25x" in limit


def test_summarize_adds_commits_only_when_every_run_has_them() -> None:
    assert summarize([dict(run_result(), commits=3), dict(run_result(), commits=4)])["commits"] == 7
    assert summarize([dict(run_result(), commits=3), run_result()])["commits"] is None


def test_render_writes_every_selected_table() -> None:
    args = parse_args(["--quick"])
    meta = {"command": "python bench/run.py --quick", "date": "today", "mode": "quick", "elapsed_s": 1,
            "machine": {"cpu": "cpu", "cores": 2, "memory_gib": 24, "kernel": "k", "somaxconn": "4096",
                        "versions": {k: "1" for k in ("python", "tornado", "websockets", "picows", "uvloop")},
                        "loadavg_start": (0.1, 0.1, 0.1)},
            "profile": vars(PROFILES["quick"]), "pinning": {"server": [0], "loadgen": [1]}, "workers": 1,
            "concurrency": 100, "client": "picows + uvloop",
            "servers": {n: {"label": n, "note": "a note"} for n in args.servers}}
    results = fake_results(10.0, 60000.0, 12.0)
    results["sensors"] = {"server": app_record("sensors", sensors_raw())}
    results["editor"] = {"server": {"error": "failed: RuntimeError: server did not start"}}
    text = report.render(meta, results, args.scenarios, args.servers)
    for heading in ("## How to read this", "## This run", "## Targets", "(`fanout`)", "(`throughput`)",
                    "(`idle`)", "(`slow`)", "Sensor dashboards: 1,000 viewers", "(`editor`)", "## Notes"):
        assert heading in text
    assert "collaborative editing, one document: n/a (failed: RuntimeError: server did not start)" in text
    assert "not available: server.py does not exist yet" in text


def test_parse_args_rejects_unknown_names() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--servers", "nginx"])
    with pytest.raises(SystemExit):
        parse_args(["--scenarios", "everything"])


def test_sections_other_commands_wrote_survive_a_rewrite_of_the_page() -> None:
    page = report.with_section("# Benchmarks\n\nold tables\n", "autobahn", "## Conformance\n\n0 FAILED")
    page = report.with_section(page, "wire", "## Wire\n\nrows")
    page = report.with_section(page, "wire", "## Wire\n\nnewer rows")  # replaced, not appended twice
    assert page.count("<!-- section:wire -->") == 1 and "newer rows" in page and "\nrows" not in page
    rewritten = report.keep_sections(page, "# Benchmarks\n\nnew tables\n")
    assert "new tables" in rewritten and "old tables" not in rewritten
    assert "0 FAILED" in rewritten and "newer rows" in rewritten


def test_the_wire_scenarios_client_reads_frames_in_every_format() -> None:
    import zlib

    import msgpack

    from bench.wire_scenario import Client
    from realtime.wire import Deflater, frame

    plain, packed = Client(False), Client(True)
    wire = frame(b'{"type":"message","text":"a"}') + frame(b'{"type":"ack"}')
    assert plain._frames(wire + wire[:3]) == wire[:3]  # an incomplete frame is kept for the next read
    assert plain.counts == {"message": 1, "ack": 1}
    assert plain.wire["message"] == len(frame(b'{"type":"message","text":"a"}'))
    packed.inflater = zlib.decompressobj(-15)
    body = Deflater().compress(msgpack.packb({"type": "readings", "points": {}}))
    packed._frames(frame(body, 2, rsv1=True) * 2)
    assert packed.counts == {"readings": 2}
