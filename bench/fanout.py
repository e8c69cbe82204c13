"""Room fan-out: N clients in one room, one sender at a fixed rate; deliveries/s, send→receive latency and
server CPU per delivery, for studyhall (auth, Postgres commit, Redis pub/sub in the path) and, in the same
run on the same machine, a bare `websockets` broadcast server (no auth, no storage) as the baseline.

Run: python -m bench.fanout [--clients 500,1000,2000] [--rate 20] [--seconds 10] [--data-dir D]
Clients run in a separate process (bench/_clients.py). Targets: ratio >= 0.8; p99 < 100 ms at 1,000
clients receiving 20 messages/s each.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile

from bench._harness import cpu_seconds, run_clients, seed, services, start_baseline, start_studyhall, stop

logger = logging.getLogger(__name__)


def measure(port: int, pid: int, n: int, rate: float, seconds: float, tokens: str | None) -> dict:
    marks: dict[str, float] = {}

    def on_line(tag: str) -> None:
        if tag in ("SENDING", "DONE"):
            marks[tag] = cpu_seconds(pid)

    args = ["fanout", "--port", str(port), "--n", str(n), "--rate", str(rate), "--seconds", str(seconds)]
    args += ["--tokens", tokens] if tokens else ["--baseline"]
    result = run_clients(args, on_line)
    cpu = marks["DONE"] - marks["SENDING"]
    result["server_cpu_s"] = round(cpu, 2)
    result["cpu_us_per_delivery"] = round(cpu / result["received"] * 1e6, 1) if result["received"] else None
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="500,1000,2000", help="comma-separated client counts")
    ap.add_argument("--rate", type=float, default=20, help="messages per second from the sender")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--data-dir", help="embedded services folder (default ./.bench/fanout)")
    args = ap.parse_args()
    counts = [int(x) for x in args.clients.split(",")]

    settings, svc = services("fanout", args.data_dir)
    sh, sh_port = start_studyhall(settings, STUDYHALL_WS_SEND_RATE="100000", STUDYHALL_WS_SEND_BURST="100000")
    base, base_port = start_baseline()
    rows = []
    try:
        room, learners, sender = seed(settings, max(counts))
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump({"room": room, "learners": learners, "sender": sender}, fh)
            tokens = fh.name
        for n in counts:
            s = measure(sh_port, sh.pid, n, args.rate, args.seconds, tokens)
            b = measure(base_port, base.pid, n, args.rate, args.seconds, None)
            rows.append((n, s, b))
            print(f"n={n}: studyhall {json.dumps(s)}\n       baseline  {json.dumps(b)}", flush=True)
    finally:
        stop(sh)
        stop(base)
        svc.close()

    print(f"\nfan-out, one room, sender at {args.rate:g} msg/s for {args.seconds:g} s "
          f"(offered deliveries/s = clients x rate)\n")
    head = (f"{'clients':>7} | {'offered/s':>9} | {'studyhall/s':>11} {'p50 ms':>7} {'p99 ms':>7} {'cpu us/d':>8} | "
            f"{'baseline/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'cpu us/d':>8} | {'ratio':>5} {'lost':>4}")
    print(head)
    print("-" * len(head))
    for n, s, b in rows:
        ratio = s["deliveries_per_s"] / b["deliveries_per_s"] if b["deliveries_per_s"] else float("nan")
        print(f"{n:>7} | {n * args.rate:>9.0f} | {s['deliveries_per_s']:>11.0f} {s['p50_ms']:>7.1f} {s['p99_ms']:>7.1f} "
              f"{s['cpu_us_per_delivery'] or 0:>8.1f} | {b['deliveries_per_s']:>10.0f} {b['p50_ms']:>7.1f} "
              f"{b['p99_ms']:>7.1f} {b['cpu_us_per_delivery'] or 0:>8.1f} | {ratio:>5.2f} "
              f"{s['expected'] - s['received']:>4}")
    print("\nratio = studyhall deliveries/s / baseline deliveries/s; cpu us/d = server-process CPU per delivery "
          "(studyhall's excludes Postgres and Redis); lost = deliveries studyhall never made")


if __name__ == "__main__":
    main()
