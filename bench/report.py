"""Markdown tables and target verdicts from a run's results (pure: no I/O)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

Result = dict[str, Any]
Results = dict[str, dict[str, Result]]

REFERENCE_CPU = "tornado"         # target: CPU/msg at most 0.5x this one's
REFERENCE_RATE = "ws-broadcast"   # target: delivered msgs/s at least this one's
OURS = "server"
IDLE_KIB_TARGET = 16.0
IDLE_AT = 10000
CPU_RATIO_TARGET = 0.5
P99_RATIO_TARGET = 1.2
SATURATED_PCT = 90.0
INTERFERENCE_PCT = 10.0  # other processes' share of our cores worth a note
SENSORS_P99_MS = 50.0     # target: tick-to-receive p99 below this ...
SENSORS_VIEWERS = 1000    # ... with this many dashboards
SENSORS_DELIVERED = 0.95  # ... receiving at least this share of the ideal batches/s
EDITOR_RATE = 1000.0      # target: ops/s applied on one document ...
EDITOR_APPLIED = 0.99     # ... (this share of the offered rate: the window's edges jitter by a few ops)
EDITOR_P99_MS = 50.0      # ... with the ack p99 below this, acks after a durable commit
DASH = "—"


def fmt_num(value: Any, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return DASH
    if digits == 0:
        return f"{value:,.0f}"
    return "{:,.{d}f}".format(value, d=digits)


def fmt_ms(value: Any) -> str:
    if value is None:
        return DASH
    return fmt_num(value, 2 if value < 10 else 1 if value < 100 else 0)


def fmt_ratio(value: Any) -> str:
    return DASH if value is None else f"{value:.2f}x"


def measured(results: dict[str, Result], servers: list[str], ok: Callable[[Result], bool],
             rows: list[list[str]], labels: dict[str, str], width: int) -> Iterator[tuple[str, Result]]:
    """(name, result) of each server that ran and whose result passes ``ok``;
    one that ran but failed gets an error row in ``rows`` instead."""
    for name in servers:
        r = results.get(name)
        if r is None:
            continue
        if not ok(r):
            rows.append(error_row(name, labels[name], r, width))
            continue
        yield name, r


def md_table(headers: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return "\n".join(lines)


def ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def run_notes(r: Result, *, lossless_expected: bool = True, capacity_run: bool = False) -> list[str]:
    notes = []
    if r.get("join_timed_out"):
        notes.append("join timed out for some clients")
    if r.get("lost") and lossless_expected:
        notes.append("{} of {} lost".format(fmt_num(r["lost"]), fmt_num(r.get("expected"))))
    if r.get("stale"):
        notes.append(f"{fmt_num(r['stale'])} late messages or acks of an earlier run")
    if r.get("dup"):
        notes.append("{} duplicates".format(fmt_num(r["dup"])))
    if r.get("published") is not None and r.get("acks") is not None and r["acks"] < r["published"]:
        notes.append("acks {}/{}".format(fmt_num(r["acks"]), fmt_num(r["published"])))
    if r.get("errors"):
        notes.append("{} error replies ({})".format(fmt_num(r["errors"]), r.get("error_text", "")[:80]))
    if r.get("disconnects"):
        codes = ", ".join(f"{n}×{c}" for c, n in sorted(r.get("close_codes", {}).items()))
        notes.append("{} disconnected{}".format(fmt_num(r["disconnects"]), " (" + codes + ")" if codes else ""))
    notes += saturation(r, capacity_run)
    return notes


def saturation(r: Result, capacity_run: bool = False) -> list[str]:
    """Which side limited the run: a server near 100 % of its core is at capacity; a load
    generator near 100 % with the server below that makes the numbers a lower bound."""
    server = (r.get("srv_cpu_pct") or 0) > SATURATED_PCT
    loadgen = (r.get("lg_cpu_pct") or 0) > SATURATED_PCT
    notes = []
    if server:
        notes.append("server at capacity" + (" (load generator near its limit too)" if loadgen else ""))
    elif loadgen:
        notes.append("load generator saturated: server numbers are a lower bound")
    elif capacity_run and (r.get("other_srv_core_pct") or 0) <= INTERFERENCE_PCT:
        notes.append("server below capacity: limited by messages in flight, not CPU")
    other = [("server's", r.get("other_srv_core_pct")), ("load generator's", r.get("other_lg_core_pct"))]
    busy = [f"{pct:.0f} % of the {who} core" for who, pct in other if (pct or 0) > INTERFERENCE_PCT]
    if busy:
        notes.append("other processes took " + " and ".join(busy))
    return notes


def error_row(name: str, label: str, r: Result, width: int) -> list[str]:
    return [label] + [DASH] * (width - 2) + [r["error"]]


def messages_table(results: dict[str, Result], servers: list[str], labels: dict[str, str],
                   offered: bool) -> str:
    ref = results.get(REFERENCE_CPU, {}).get("us_per_msg")
    headers = ["system", "conns", "rooms"] + (["offered msgs/s"] if offered else ["in flight"]) + [
        "delivered msgs/s", "srv CPU µs/msg", "vs tornado", "srv CPU %", "p50 ms", "p99 ms",
        "srv KiB/conn", "lost", "loadgen CPU %", "notes"]
    rows: list[list[str]] = []
    def ok(r: Result) -> bool:
        return "error" not in r or r.get("rate") is not None

    for name, r in measured(results, servers, ok, rows, labels, len(headers)):
        extra = fmt_num(r.get("offered")) if offered else fmt_num(r.get("inflight"))
        rows.append([labels[name], fmt_num(r.get("conns")), fmt_num(r.get("rooms")), extra,
                     fmt_num(r.get("rate")), fmt_num(r.get("us_per_msg"), 2),
                     fmt_ratio(ratio(r.get("us_per_msg"), ref)), fmt_num(r.get("srv_cpu_pct")),
                     fmt_ms(r.get("p50_ms")), fmt_ms(r.get("p99_ms")), fmt_num(r.get("kib_per_conn"), 1),
                     fmt_num(r.get("lost")), fmt_num(r.get("lg_cpu_pct")),
                     "; ".join(run_notes(r, capacity_run=not offered))])
    return md_table(headers, rows)


def connect_table(results: dict[str, Result], servers: list[str], labels: dict[str, str]) -> str:
    headers = ["system", "conns", "handshakes/s", "srv CPU µs/handshake", "p50 ms", "p99 ms",
               "srv CPU %", "loadgen CPU %", "notes"]
    rows: list[list[str]] = []
    for name, r in measured(results, servers, lambda r: r.get("rate") is not None, rows, labels, len(headers)):
        notes = []
        if r.get("failed"):
            notes.append("{} failed ({})".format(fmt_num(r["failed"]), "; ".join(r.get("failures", []))[:120]))
        notes += saturation(r)
        rows.append([labels[name], fmt_num(r["conns"]), fmt_num(r["rate"]), fmt_num(r.get("us_per_unit")),
                     fmt_ms(r.get("p50_ms")), fmt_ms(r.get("p99_ms")), fmt_num(r.get("srv_cpu_pct")),
                     fmt_num(r.get("lg_cpu_pct")), "; ".join(notes)])
    return md_table(headers, rows)


def idle_table(results: dict[str, Result], servers: list[str], labels: dict[str, str]) -> str:
    headers = ["system", "conns", "RSS before MiB", "RSS after MiB", "KiB/conn", "notes"]
    rows: list[list[str]] = []
    for name, r in measured(results, servers, lambda r: r.get("kib_per_conn") is not None, rows, labels, len(headers)):
        rows.append([labels[name], fmt_num(r["conns"]), fmt_num(r["rss_before"] / 2**20, 1),
                     fmt_num(r["rss_after"] / 2**20, 1), fmt_num(r["kib_per_conn"], 1), ""])
    return md_table(headers, rows)


def slow_table(results: dict[str, Result], servers: list[str], labels: dict[str, str]) -> str:
    headers = ["system", "conns", "stalled", "delivered msgs/s", "srv CPU µs/msg", "fast p50 ms",
               "fast p99 ms", "p99 no stalls", "p99 ratio", "RSS growth MiB", "bound MiB", "lost (fast)",
               "stalled closed", "loadgen CPU %", "notes"]
    rows: list[list[str]] = []
    for name, r in measured(results, servers, lambda r: r.get("growth") is not None, rows, labels, len(headers)):
        codes = ", ".join(f"{n}×{c}" for c, n in sorted(r.get("stalled_close_codes", {}).items()))
        notes = [n for n in run_notes(r, lossless_expected=False) if "disconnected" not in n]
        control = r.get("control", {})
        if control.get("lost"):
            notes.append("control run lost {}".format(fmt_num(control["lost"])))
        if r.get("disconnects"):
            notes.append("{} fast clients disconnected".format(fmt_num(r["disconnects"])))
        rows.append([labels[name], fmt_num(r["conns"]), fmt_num(r["stalled"]), fmt_num(r.get("rate")),
                     fmt_num(r.get("us_per_msg"), 2), fmt_ms(r.get("p50_ms")), fmt_ms(r.get("p99_ms")),
                     fmt_ms(control.get("p99_ms")), fmt_ratio(r.get("p99_ratio")),
                     fmt_num(r["growth"] / 2**20, 1),
                     fmt_num(r["bound"] / 2**20, 1) if r.get("bound") else DASH,
                     fmt_num(r.get("lost")),
                     fmt_num(r.get("stalled_closed")) + (" (" + codes + ")" if codes else ""),
                     fmt_num(r.get("lg_cpu_pct")), "; ".join(notes)])
    return md_table(headers, rows)


def app_notes(r: Result) -> list[str]:
    notes = []
    if r.get("connect_failures"):
        notes.append("{} could not connect ({})".format(fmt_num(r["connect_failures"]),
                                                        r.get("first_failure", "")[:80]))
    if r.get("errors"):
        notes.append("{} error replies ({})".format(fmt_num(r["errors"]), r.get("error_text", "")[:80]))
    if r.get("closed_early"):
        notes.append("{} closed while measuring".format(fmt_num(r["closed_early"])))
    if r.get("disconnects"):
        notes.append("{} disconnected".format(fmt_num(r["disconnects"])))
    if r.get("pinned") is False:
        notes.append("not pinned: server and load generator shared the cores")
    return notes + saturation(r)


def sensors_table(results: dict[str, Result], labels: dict[str, str]) -> str:
    headers = ["system", "viewers", "sensors x Hz", "delivered batches/s", "ideal batches/s",
               "srv CPU µs/batch", "srv CPU %", "p50 ms", "p99 ms", "max ms", "loadgen CPU %", "notes"]
    rows: list[list[str]] = []
    names = {name: labels.get(name, name) for name in results}
    for name, r in measured(results, list(results), lambda r: r.get("rate") is not None, rows, names, len(headers)):
        label = names[name]
        rows.append([label, fmt_num(r.get("conns")), "{} x {:g}".format(r.get("sensors"), r.get("hz") or 0),
                     fmt_num(r.get("rate")), fmt_num(r.get("ideal")), fmt_num(r.get("us_per_msg"), 1),
                     fmt_num(r.get("srv_cpu_pct")), fmt_ms(r.get("p50_ms")), fmt_ms(r.get("p99_ms")),
                     fmt_ms(r.get("max_ms")), fmt_num(r.get("lg_cpu_pct")), "; ".join(app_notes(r))])
    return md_table(headers, rows)


def editor_table(results: dict[str, Result], labels: dict[str, str]) -> str:
    headers = ["system", "editors", "offered ops/s", "applied ops/s", "srv CPU µs/op", "srv CPU %",
               "ack p50 ms", "ack p99 ms", "ack max ms", "converged", "durable", "loadgen CPU %", "notes"]
    rows: list[list[str]] = []
    names = {name: labels.get(name, name) for name in results}
    for name, r in measured(results, list(results), lambda r: r.get("rate") is not None, rows, names, len(headers)):
        label = names[name]
        converged = (f"yes (rev {fmt_num(r.get('final_rev'))}, {fmt_num(r.get('final_length'))} chars)"
                     if r.get("converged") else "NO")
        rows.append([label, fmt_num(r.get("editors")), fmt_num(r.get("offered")), fmt_num(r.get("rate")),
                     fmt_num(r.get("us_per_msg")), fmt_num(r.get("srv_cpu_pct")), fmt_ms(r.get("p50_ms")),
                     fmt_ms(r.get("p99_ms")), fmt_ms(r.get("max_ms")), converged, str(r.get("durable", DASH)),
                     fmt_num(r.get("lg_cpu_pct")), "; ".join(app_notes(r))])
    return md_table(headers, rows)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "MET" if ok else "NOT MET"


def target_line(what: str, value: str, target: str, ok: bool | None, extra: str = "") -> str:
    return f"- {what}: {value}  target {target}  {verdict(ok)}{extra}"


def targets(results: Results) -> list[str]:
    """One line per target of the issue, computed from this run's numbers."""
    lines = []

    def missing(scenario: str, ref: str | None = None) -> str | None:
        """Why there is no verdict for ``scenario``, or None when there can be one."""
        if scenario not in results:
            return "scenario not run"
        r = results[scenario].get(OURS)
        if r is None:
            return "server not run"
        if "error" in r and r.get("rate") is None and r.get("growth") is None and r.get("kib_per_conn") is None:
            return r["error"]
        if ref and results[scenario].get(ref, {}).get("rate") is None:
            return f"{ref} baseline not run"
        return None

    def unknown(what: str, why: str, target: str) -> str:
        return f"- {what}: n/a ({why})  target {target}"

    cpu_target = f"<={CPU_RATIO_TARGET:.1f}x"
    for scenario in ("fanout", "rooms"):
        what = f"CPU/msg vs tornado write_message ({scenario})"
        why = missing(scenario, REFERENCE_CPU)
        if why:
            if scenario == "fanout":  # the rooms line only adds to a measured fanout line
                lines.append(unknown(what, why, cpu_target))
            continue
        x = ratio(results[scenario][OURS].get("us_per_msg"), results[scenario][REFERENCE_CPU].get("us_per_msg"))
        ok = None if x is None else x <= CPU_RATIO_TARGET
        lines.append(target_line(what, fmt_ratio(x), cpu_target, ok))
        if ok is False:
            lines.append(limit_line(cpu_limit(scenario, results)))

    what = "delivered msgs/s vs websockets broadcast() (throughput)"
    why = missing("throughput", REFERENCE_RATE)
    if why:
        lines.append(unknown(what, why, ">=1.0x, nothing lost"))
    else:
        r = results["throughput"][OURS]
        x = ratio(r.get("rate"), results["throughput"][REFERENCE_RATE].get("rate"))
        lost = (r.get("lost") or 0) + (r.get("dup") or 0)
        ok = None if x is None else x >= 1.0 and lost == 0
        lines.append(target_line(what, f"{fmt_ratio(x)}, {fmt_num(r.get('lost'))} lost", ">=1.0x, nothing lost", ok))
        if ok is False:
            lines.append(limit_line(throughput_limit(r, results["throughput"][REFERENCE_RATE])))

    what = "memory per idle connection"
    kib_target = f"<={IDLE_KIB_TARGET:.0f} KiB at {fmt_num(IDLE_AT)}"
    why = missing("idle")
    if why:
        lines.append(unknown(what, why, kib_target))
    else:
        r = results["idle"][OURS]
        at = "" if r["conns"] >= IDLE_AT else (
            f" (measured at {fmt_num(r['conns'])} connections; the target is for {fmt_num(IDLE_AT)})")
        ok = r["kib_per_conn"] <= IDLE_KIB_TARGET
        lines.append(target_line(what, f"{fmt_num(r['kib_per_conn'], 1)} KiB", kib_target, ok, at))
        if not ok:
            ref = results["idle"].get(REFERENCE_CPU, {}).get("kib_per_conn")
            lines.append(limit_line(
                f"per-connection state: {fmt_num(r['kib_per_conn'], 1)} KiB each"
                + (f", where the Tornado demo, which keeps nothing per connection but Tornado's own objects, "
                   f"uses {fmt_num(ref, 1)} KiB" if ref is not None else "")))

    growth_what = "slow consumers, server memory growth"
    p99_what = "slow consumers, fast clients' p99 vs no stalls"
    p99_target = f"<={P99_RATIO_TARGET:.1f}x, nothing lost"
    why = missing("slow")
    if why:
        lines.append(unknown(growth_what, why, "<= stalled clients x per-connection cap"))
        lines.append(unknown(p99_what, why, p99_target))
    else:
        r = results["slow"][OURS]
        growth = fmt_num(r["growth"] / 2**20, 1)
        if r.get("bound"):
            bound, cap = fmt_num(r["bound"] / 2**20, 1), fmt_num(r["write_cap"] / 1024)
            target = f"<= {bound} MiB ({r['stalled']} stalled x {cap} KiB cap)"
            lines.append(target_line(growth_what, f"{growth} MiB", target, r["growth"] <= r["bound"]))
            if r["growth"] > r["bound"]:
                lines.append(limit_line(
                    f"the server had closed {fmt_num(r.get('stalled_closed'))} of {r['stalled']} stalled clients "
                    "when they read again; until it closes one, its unsent frames stay in memory"))
        else:
            lines.append(f"- {growth_what}: {growth} MiB, bound unknown (pass --write-cap)  n/a")
        x = r.get("p99_ratio")
        lost = r.get("lost") or 0
        value = f"{fmt_ratio(x)} ({fmt_ms(r.get('p99_ms'))} ms vs {fmt_ms(r.get('control', {}).get('p99_ms'))} ms)"
        if lost:
            value += f", {fmt_num(lost)} fast messages lost"
        ok = None if x is None else x <= P99_RATIO_TARGET and lost == 0
        lines.append(target_line(p99_what, value, p99_target, ok))
        if ok is False:
            lines.append(limit_line(slow_limit(r)))

    lines += sensors_target(results)
    lines += editor_target(results)
    return lines


def limit_line(text: str) -> str:
    return f"  - limit: {text}"


def noise(r: Result, ref: Result | None = None, ref_name: str = "") -> str:
    """'; other processes took ...' when they did during ``r`` (or the ``ref`` row it is
    compared with), else ''."""
    parts = []
    for row, whose in ((r, ""), (ref or {}, f" during the {ref_name} row")):
        other = [("server's", row.get("other_srv_core_pct")), ("load generator's", row.get("other_lg_core_pct"))]
        busy = [f"{pct:.0f} % of the {who} core" for who, pct in other if (pct or 0) > INTERFERENCE_PCT]
        if busy:
            parts.append(" and ".join(busy) + whose)
    return "; other processes took " + ", ".join(parts) + " (rerun on a quiet machine)" if parts else ""


def cpu_limit(scenario: str, results: Results) -> str:
    """What the CPU/msg ratio of ``scenario`` is made of, from this run's rows."""
    ours, ref = results[scenario][OURS], results[scenario][REFERENCE_CPU]
    if scenario == "rooms":
        # Each say costs a fixed part (receive, store, ack) and a part per member; in a room
        # of ten the fixed part is shared by ten deliveries only.
        size = (ours.get("conns") or 0) / (ours.get("rooms") or 1)
        text = (f"the cost of each say, which only {size:.0f} deliveries share: "
                f"{fmt_num((ours.get('us_per_msg') or 0) * size)} µs of server CPU per say against the Tornado "
                f"demo's {fmt_num((ref.get('us_per_msg') or 0) * size)}, which stores nothing; ours runs a "
                "durable SQLite transaction per say in its writer thread before the ack")
        commits, says = ours.get("commits"), ours.get("published")
        if commits and says:
            per_commit = says / commits
            text += (f"; at {fmt_num((ours.get('offered') or 0) / (size or 1))} says/s "
                     + (f"each say had a commit of its own ({per_commit:.1f} says per commit)" if per_commit < 1.5
                        else f"{per_commit:.1f} says shared a commit"))
        fan = results.get("fanout", {})
        x = ratio(fan.get(OURS, {}).get("us_per_msg"), fan.get(REFERENCE_CPU, {}).get("us_per_msg"))
        if x is not None:
            text += f"; in the one big room (fanout), where a say reaches thousands, ours is {fmt_ratio(x)} tornado"
        return text + noise(ours, ref, REFERENCE_CPU)
    b = results[scenario].get(REFERENCE_RATE, {})
    text = (f"the cost of each delivery: {fmt_num(ours.get('us_per_msg'), 1)} µs/msg against the Tornado demo's "
            f"{fmt_num(ref.get('us_per_msg'), 1)}")
    if b.get("us_per_msg"):
        text += f" (websockets broadcast(), one send per member too: {fmt_num(b['us_per_msg'], 1)})"
    thr = results.get("throughput", {})
    if thr.get(OURS, {}).get("us_per_msg") and thr.get(REFERENCE_CPU, {}).get("us_per_msg"):
        x = thr[OURS]["us_per_msg"] / thr[REFERENCE_CPU]["us_per_msg"]
        text += (f"; at a low rate every message is its own send to each socket, at capacity ours is "
                 f"{fmt_num(thr[OURS]['us_per_msg'], 1)} µs/msg ({fmt_ratio(x)} tornado)")
    return text + noise(ours, ref, REFERENCE_CPU)


def throughput_limit(r: Result, ref: Result) -> str:
    if r.get("lost") or r.get("dup"):
        return f"{fmt_num(r.get('lost'))} lost and {fmt_num(r.get('dup'))} duplicated deliveries" + noise(r)
    extra = noise(r, ref, REFERENCE_RATE)
    if (r.get("srv_cpu_pct") or 0) > SATURATED_PCT:
        return (f"server CPU: at capacity ({fmt_num(r['srv_cpu_pct'])} % of its core) at "
                f"{fmt_num(r.get('us_per_msg'), 1)} µs/msg, where websockets broadcast() needs "
                f"{fmt_num(ref.get('us_per_msg'), 1)}" + extra)
    if (r.get("lg_cpu_pct") or 0) > SATURATED_PCT:
        return f"the load generator ({fmt_num(r['lg_cpu_pct'])} % of its core), not the server" + extra
    return (f"the deliveries kept in flight, not CPU (server at {fmt_num(r.get('srv_cpu_pct'))} % of its core)"
            + extra)


def slow_limit(r: Result) -> str:
    control = r.get("control", {})
    text = (f"fast clients' p99 {fmt_ms(r.get('p99_ms'))} ms against {fmt_ms(control.get('p99_ms'))} ms, "
            f"server at {fmt_num(r.get('srv_cpu_pct'))} % of its core (control "
            f"{fmt_num(control.get('srv_cpu_pct'))} %)")
    if r.get("lost"):
        text += f"; {fmt_num(r['lost'])} fast-client messages lost"
    return text + noise(r)


def sensors_check(r: Result) -> tuple[bool | None, list[str]]:
    """(target met, the criteria that failed): p99 under the bound, nearly every batch
    delivered, no viewer refused or dropped. None when there is no p99 at all."""
    p99 = r.get("p99_ms")
    if p99 is None:
        return None, ["no latency sample"]
    failed = []
    if p99 >= SENSORS_P99_MS:
        failed.append(f"p99 {fmt_ms(p99)} ms")
    ideal = r.get("ideal") or 0
    if ideal and (r.get("rate") or 0) < SENSORS_DELIVERED * ideal:
        failed.append(f"{fmt_num(r.get('rate'))} of {fmt_num(ideal)} batches/s delivered")
    if r.get("connect_failures"):
        failed.append(f"{fmt_num(r['connect_failures'])} viewers could not connect")
    if r.get("closed_early"):
        failed.append(f"{fmt_num(r['closed_early'])} viewers closed while measuring")
    return not failed, failed


def sensors_target(results: Results) -> list[str]:
    what = "sensor dashboards, tick-to-receive p99"
    target = f"<{SENSORS_P99_MS:.0f} ms at {fmt_num(SENSORS_VIEWERS)} viewers, every batch delivered"
    if "sensors" not in results:
        return []
    r = results["sensors"].get(OURS)
    if r is None or r.get("rate") is None:
        return [f"- {what}: n/a ({(r or {}).get('error', 'server not run')})  target {target}"]
    ok, failed = sensors_check(r)
    value = (f"{fmt_ms(r.get('p99_ms'))} ms at {fmt_num(r.get('conns'))} viewers "
             f"({fmt_num(r.get('rate'))} of {fmt_num(r.get('ideal'))} batches/s)")
    at = "" if (r.get("viewers") or 0) >= SENSORS_VIEWERS else (
        f" (measured at {fmt_num(r.get('viewers'))} viewers; the target is for {fmt_num(SENSORS_VIEWERS)})")
    lines = [target_line(what, value, target, ok, at)]
    if ok is False:
        lines.append(limit_line(", ".join(failed) + "; " + load_limit(r)))
    return lines


def editor_check(r: Result) -> tuple[bool | None, list[str]]:
    """(target met, the criteria that failed) for the editor: applied rate, ack p99,
    convergence, no errors, durable."""
    if r.get("rate") is None:
        return None, ["no rate"]
    failed = []
    offered = r.get("offered") or EDITOR_RATE
    if r["rate"] < EDITOR_APPLIED * max(offered, EDITOR_RATE):
        failed.append(f"{fmt_num(r['rate'])} ops/s applied of {fmt_num(offered)} offered")
    p99 = r.get("p99_ms")
    if p99 is None or p99 >= EDITOR_P99_MS:
        failed.append(f"ack p99 {fmt_ms(p99)} ms")
    if not r.get("converged"):
        failed.append("the copies did not converge")
    if r.get("errors"):
        failed.append(f"{fmt_num(r['errors'])} error replies ({r.get('error_text', '')[:80]})")
    if "FULL" not in str(r.get("durable", "")):
        failed.append(f"not durable ({r.get('durable')})")
    return not failed, failed


def editor_target(results: Results) -> list[str]:
    what = "collaborative editing, one document"
    target = (f">={fmt_num(EDITOR_RATE)} ops/s applied, ack p99 <{EDITOR_P99_MS:.0f} ms, "
              "acks after a durable commit, copies converge")
    if "editor" not in results:
        return []
    r = results["editor"].get(OURS)
    if r is None or r.get("rate") is None:
        return [f"- {what}: n/a ({(r or {}).get('error', 'server not run')})  target {target}"]
    ok, failed = editor_check(r)
    value = (f"{fmt_num(r['rate'])} ops/s applied by {fmt_num(r.get('editors'))} editors, ack p99 "
             f"{fmt_ms(r.get('p99_ms'))} ms, {r.get('durable')}, "
             + ("converged" if r.get("converged") else "NOT converged"))
    lines = [target_line(what, value, target, ok)]
    if ok is False:
        why = ", ".join(failed)
        if r.get("editors") and r.get("offered") and any("applied" in f for f in failed):
            interval = r["editors"] / r["offered"] * 1000
            why += (f"; each editor keeps one op in flight and edits every {interval:.0f} ms, so acks slower "
                    "than that compose its edits into fewer ops")
        lines.append(limit_line(why + "; " + load_limit(r)))
    return lines


def load_limit(r: Result) -> str:
    """Which side was busy during an app run, from its CPU figures."""
    srv, lg = r.get("srv_cpu_pct") or 0, r.get("lg_cpu_pct") or 0
    if srv > SATURATED_PCT:
        text = (f"the server's CPU: {fmt_num(srv)} % of its core at {fmt_num(r.get('us_per_msg'), 1)} µs per "
                f"{'batch' if 'viewers' in r else 'op'}")
    elif lg > SATURATED_PCT:
        text = f"the load generator ({fmt_num(lg)} % of its core): its own queueing is in the latency"
    else:
        text = f"server at {fmt_num(srv)} % of its core, load generator at {fmt_num(lg)} %"
    return text + noise(r)


TITLES = {
    "fanout": "Chat fan-out: one room, every client a member, a steady publish rate",
    "throughput": "Chat fan-out at capacity: one room, a fixed number of messages in flight",
    "rooms": "Many small rooms: rooms of {size}, the first member of each publishes",
    "idle": "Idle connections: server memory",
    "connect": "Connection rate",
    "slow": "Slow consumers: every fifth client stops reading",
    "sensors": "Sensor dashboards: {viewers} viewers, 20 sensors each at 10 Hz",
    "editor": "Collaborative editing: 50 editors on one document",
}


def describe(scenario: str, p: dict[str, Any], results: dict[str, Result]) -> str:
    any_r = next((r for r in results.values() if r.get("conns")), {})
    reps = f"median of {p['reps']} runs" if p["reps"] > 1 else "one run"
    if scenario == "fanout":
        rate = fmt_num(p["fanout_rate"], 1 if p["fanout_rate"] < 10 else 0)
        return (f"{rate} says/s of ~{p['text_len']}-byte texts into one room of {fmt_num(any_r.get('conns'))} "
                f"members ({fmt_num(any_r.get('offered'))} deliveries/s offered), {p['fanout_secs']:g} s per run, "
                f"{reps}.")
    if scenario == "throughput":
        return (f"The publisher keeps about {p['inflight_secs']:g} s of deliveries in flight (messages said but "
                f"not yet received by every member; at least {fmt_num(p['inflight_min'])}, at most "
                f"{fmt_num(p['inflight_max'])} deliveries) for {p['throughput_secs']:g} s per run, {reps}: "
                "delivered msgs/s is the server's capacity when its CPU is near 100 %.")
    if scenario == "rooms":
        return (f"{fmt_num(p['rooms_rate'])} says/s in total spread over the rooms, ~{p['text_len']}-byte texts, "
                f"{p['rooms_secs']:g} s per run, {reps}.")
    if scenario == "idle":
        return ("Server RSS before connecting and after every client has its `welcome` (no room "
                "joined, nothing sent). Each fan-out table's KiB/conn is the same after joining.")
    if scenario == "connect":
        return ("Handshakes from the first connect to the last `welcome`, at most {} in flight; "
                "latency is connect to `welcome` per client.".format(fmt_num(p.get("concurrency"))))
    if scenario == "slow":
        return (f"One room of {fmt_num(p['slow_members'])} members, {fmt_num(p['slow_rate'])} says/s of "
                f"~{fmt_num(p['slow_text'])}-byte texts. A control run of {p['slow_control_secs']:g} s with every "
                f"client reading, then {p['slow_secs']:g} s with every fifth client no longer reading its socket. "
                "RSS growth is the peak during the stalled run over the RSS before it; the bound is stalled "
                "clients x the server's per-connection cap. Fast clients' messages must all arrive. "
                "'stalled closed' is how many stalled clients the server had closed when they read again.")
    if scenario == "sensors":
        r = results.get(OURS, {})
        return (f"bench/sensors_scenario.py: server.py with {r.get('sensors', 20)} simulated sensors at "
                f"{r.get('hz', 10):g} Hz; every viewer subscribes to all of them at {r.get('hz', 10):g} Hz and gets "
                "one `readings` batch per tick. Measured over "
                f"{fmt_num(r.get('duration_s'), 1)} s after a 2 s warm-up. Latency is tick to receive: the "
                "server's `ts` of the tick in the batch, subtracted from the viewer's clock on arrival "
                "(same machine). srv CPU µs/batch is the server's CPU over the window divided by the batches "
                "delivered. server.py only: the baselines have no sensor app.")
    if scenario == "editor":
        r = results.get(OURS, {})
        return ("bench/editor_scenario.py: each editor makes a random 1-3 character insert or delete at a steady "
                "rate (all together the offered ops/s), keeping one op in flight as an OT client does and "
                "composing later edits until the ack. Applied ops/s is the server's revision count over the "
                f"{fmt_num(r.get('duration_s'), 1)} s window; ack latency is op sent to its ack, which the server "
                "sends only after the op's SQLite commit (synchronous=FULL, fsync'd); converged means every "
                "editor's text equals the server's at the end. server.py only: the baselines have no editor.")
    return ""


HOW_TO_READ = [
    "## How to read this",
    "",
    "- Every number below comes from the one run described under *This run*: the same machine, the "
    "same load generator, one system at a time. Compare rows of one table; numbers from another run "
    "or another machine are not comparable.",
    "- **Targets** are the performance goals set for this server. Each line shows the measured value, "
    "the goal, and MET or NOT MET; under each NOT MET, *limit* says what this run's numbers show "
    "holding it back. A run with fewer connections than a target names (`--quick`) still gets a "
    "verdict, with the count it was measured at.",
    "- **vs tornado** and the CPU/msg targets divide our server's CPU per delivered message by "
    "that of the Tornado demo baseline (`tornado`: `write_message(dict)` to each member) measured in "
    "the same run; below 1.00x is cheaper than the demo.",
    "- Columns: *conns* clients connected; *offered msgs/s* deliveries asked for (says/s x members); "
    "*in flight* deliveries outstanding (throughput); *delivered msgs/s* messages clients received per "
    "second; *srv CPU µs/msg* server CPU time per delivered message (lower is better); *srv CPU %* "
    "and *loadgen CPU %* of one core (near 100 % the server, or the load generator, is the limit); "
    "*p50/p99 ms* end-to-end latency, sender to receiver; *srv KiB/conn* server memory per client; "
    "*lost* messages a reading client never received; *notes* anything that makes a row less "
    "trustworthy: losses, errors, a saturated side, other processes on our cores.",
    "- Chat tables compare our server with three baselines; the sensor and editor tables are our "
    "server alone (the baselines have no such apps) and explain their own columns.",
]


def interference_line(results: Results) -> str:
    worst = {"other_srv_core_pct": 0.0, "other_lg_core_pct": 0.0}
    for by_server in results.values():
        for r in by_server.values():
            for run in [r] + r.get("runs", []) + ([r["control"]] if "control" in r else []):
                for key, value in worst.items():
                    worst[key] = max(value, run.get(key) or 0.0)
    line = (f"- other processes on the machine took up to {worst['other_srv_core_pct']:.0f} % of the server's "
            f"core and {worst['other_lg_core_pct']:.0f} % of the load generator's core during a measured run")
    if max(worst.values()) > INTERFERENCE_PCT:
        line += ": **rows noting it are unreliable; rerun on a quiet machine**"
    return line


def render(meta: dict[str, Any], results: Results, scenarios: list[str], servers: list[str]) -> str:
    m = meta["machine"]
    v = m["versions"]
    p = dict(meta["profile"], concurrency=meta.get("concurrency", meta["profile"].get("concurrency")))
    server_cores = ",".join(map(str, meta["pinning"]["server"])) or "any"
    loadgen_cores = ",".join(map(str, meta["pinning"]["loadgen"])) or "any"
    labels = {name: "{} (`{}`)".format(meta["servers"][name]["label"], name) for name in servers}
    out = ["# Benchmarks", "",
           "Written by `bench/run.py`; rerun it to refresh this page.", ""]
    out += HOW_TO_READ
    out += ["", "## This run", "",
           "- command: `{}`".format(meta["command"]),
           "- date: {}, {} mode, {:.0f} s".format(meta["date"], meta["mode"], meta.get("elapsed_s", 0)),
           "- machine: {}, {} cores, {} GiB, Linux {}, somaxconn {}".format(
               m["cpu"], m["cores"], m["memory_gib"], m["kernel"], m["somaxconn"]),
           "- software: Python {}, Tornado {}, websockets {}, picows {}, uvloop {}".format(
               v["python"], v["tornado"], v["websockets"], v["picows"], v["uvloop"]),
           (f"- placement: server on core {server_cores}; load generator ({meta.get('client', '?')}, "
            f"{meta['workers']} process{'' if meta['workers'] == 1 else 'es'}) and runner on core {loadgen_cores}"),
           "- load average (1/5/15 min) at start {}, at end {}".format(
               "/".join(f"{x:.2f}" for x in m["loadavg_start"]),
               "/".join(f"{x:.2f}" for x in meta.get("loadavg_end", m["loadavg_start"]))),
           interference_line(results) + (
               f" (the run waited {meta['waited_s']} s for a quieter machine)" if meta.get("waited_s") else ""),
           "", "## Targets", ""]
    out += targets(results)
    for scenario in ["fanout", "throughput", "rooms", "idle", "connect", "slow", "sensors", "editor"]:
        if scenario not in scenarios or scenario not in results:
            continue
        res = results[scenario]
        viewers = fmt_num(res.get(OURS, {}).get("viewers")) if scenario == "sensors" else ""
        out += ["", "## {} (`{}`)".format(TITLES[scenario].format(size=p["rooms_size"], viewers=viewers),
                                          scenario), "",
                describe(scenario, p, res), ""]
        if scenario in ("fanout", "rooms"):
            out.append(messages_table(res, servers, labels, offered=True))
        elif scenario == "throughput":
            out.append(messages_table(res, servers, labels, offered=False))
        elif scenario == "idle":
            out.append(idle_table(res, servers, labels))
        elif scenario == "connect":
            out.append(connect_table(res, servers, labels))
        elif scenario == "sensors":
            out.append(sensors_table(res, labels))
        elif scenario == "editor":
            out.append(editor_table(res, labels))
        else:
            out.append(slow_table(res, servers, labels))
    out += ["", "## Notes", ""]
    for name in servers:
        out.append("- {}: {}.".format(labels[name], meta["servers"][name]["note"]))
    if OURS in servers and meta.get("write_cap"):
        out.append("- server.py's per-connection write cap: {} bytes (from {}).".format(
            fmt_num(meta["write_cap"]), meta.get("write_cap_source")))
    out += [
        ("- Baselines store nothing and reply to `join` with empty members and history; every "
        "system answers `say` with an `ack` and sends the `message` to every member, sender included."),
        ("- srv CPU is the server process's user+system time (the kernel's rusage counters, all threads) "
        "over the run, divided by messages the clients received; srv CPU % and loadgen CPU % are of "
        "one core over the same wall time. Memory is RSS."),
        ("- Latency is end to end on one clock: the publisher's `time.monotonic_ns()` in the text, "
        "subtracted from the receiver's on arrival; it includes the load generator's own queueing, "
        "so a saturated load generator (loadgen CPU near 100 %) inflates it."),
        (f"- 'lost' counts messages a reading client had not received {p['quiet']:g} s after the last "
         f"arrival ({p['quiet_unacked']:g} s while acks were outstanding); the load generator ignores "
         "`presence` and every other type but message/joined/ack/error."),
        ("- Two cores: the server gets one, the load generator the other. Other work on the machine "
        "(see the load average) adds noise; compare rows of the same run, not across runs."),
    ]
    if any(sc in scenarios and sc in results for sc in ("sensors", "editor")):
        out.append("- sensors and editor: bench/sensors_scenario.py and bench/editor_scenario.py start their own "
                   "server.py (a fresh data_dir, pinned to core 0) and run their clients in the runner's process "
                   "on the load generator's core; their 'other processes' notes are measured over the scenario's "
                   "window the same way.")
    return "\n".join(out) + "\n"


# -- sections written by other commands ------------------------------------------------------

def marked(name: str, body: str) -> str:
    """A section of docs/BENCHMARKS.md that another command owns (bench/wire_scenario.py,
    scripts/autobahn.py): kept when bench/run.py rewrites the page."""
    return "<!-- section:%s -->\n%s\n<!-- /section:%s -->\n" % (name, body.strip(), name)


_MARKED = re.compile(r"<!-- section:([\w-]+) -->\n.*?<!-- /section:\1 -->\n", re.S)


def with_section(page: str, name: str, body: str) -> str:
    """``page`` with the section ``name`` replaced by ``body`` (appended if new)."""
    block = marked(name, body)
    pattern = re.compile(r"<!-- section:%s -->\n.*?<!-- /section:%s -->\n" % (re.escape(name), re.escape(name)), re.S)
    if pattern.search(page):
        return pattern.sub(lambda _m: block, page)
    return page.rstrip("\n") + "\n\n" + block


def keep_sections(old_page: str, new_page: str) -> str:
    """``new_page`` plus every marked section of ``old_page`` it lacks."""
    for m in _MARKED.finditer(old_page):
        if ("<!-- section:%s -->" % m.group(1)) not in new_page:
            new_page = new_page.rstrip("\n") + "\n\n" + m.group(0)
    return new_page
