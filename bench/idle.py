"""Memory per idle websocket connection: server RSS before and after N idle clients joined one course room
(clients in a separate process), against the bare `websockets` server as the baseline.

Run: python -m bench.idle [--clients 5000] [--data-dir D]      Target: <= 50 KiB per idle connection.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

from bench._harness import ROOT, cpu_seconds, rss_kib, seed, services, start_baseline, start_studyhall, stop


def hold(port: int, pid: int, n: int, tokens: str | None, settle_s: float) -> dict:
    """RSS of the server with `n` idle clients, relative to the same server after a warm-up round."""
    def run(count: int, measure: bool) -> dict:
        args = [sys.executable, "-m", "bench._clients", "idle", "--port", str(port), "--n", str(count)]
        args += ["--tokens", tokens] if tokens else ["--baseline"]
        proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdin is not None
        out: dict = {}
        for line in proc.stdout:
            if line.strip() == "IDLE":
                break
        if measure:
            time.sleep(settle_s)  # let joins, welcomes and a few presence heartbeats pass
            cpu0 = cpu_seconds(pid)
            time.sleep(settle_s)
            out["idle_cpu_pct"] = round((cpu_seconds(pid) - cpu0) / settle_s * 100, 1)
            out["rss_kib"] = rss_kib(pid)
        proc.stdin.write("\n")
        proc.stdin.flush()
        for line in proc.stdout:
            if line.startswith("{"):
                out.update(json.loads(line))
        proc.wait()
        return out

    run(min(n, 500), measure=False)  # warm-up: imports, pools and first-use allocations
    time.sleep(settle_s)
    before = rss_kib(pid)
    held = run(n, measure=True)
    held["rss_before_kib"] = before
    held["kib_per_conn"] = round((held["rss_kib"] - before) / n, 1)
    return held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=5000)
    ap.add_argument("--settle", type=float, default=5.0, help="seconds to wait before measuring")
    ap.add_argument("--data-dir")
    args = ap.parse_args()

    settings, svc = services("idle", args.data_dir)
    sh, sh_port = start_studyhall(settings)
    base, base_port = start_baseline()
    try:
        room, learners, sender = seed(settings, args.clients)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump({"room": room, "learners": learners, "sender": sender}, fh)
        s = hold(sh_port, sh.pid, args.clients, fh.name, args.settle)
        b = hold(base_port, base.pid, args.clients, None, args.settle)
    finally:
        stop(sh)
        stop(base)
        svc.close()
    print(f"studyhall {json.dumps(s)}\nbaseline  {json.dumps(b)}\n")
    print(f"{args.clients} idle clients in one room (server RSS delta / clients):")
    print(f"  studyhall: {s['kib_per_conn']:.1f} KiB per connection (target <= 50), idle CPU {s['idle_cpu_pct']}% "
          f"(presence heartbeats), {s['alive']}/{s['clients']} still open"
          + (f" (closed with codes: {s['closed']})" if s.get("closed") else ""))
    print(f"  baseline:  {b['kib_per_conn']:.1f} KiB per connection, idle CPU {b['idle_cpu_pct']}%")
    print(f"  ratio studyhall/baseline: {s['kib_per_conn'] / b['kib_per_conn']:.2f}" if b["kib_per_conn"] > 0 else "")


if __name__ == "__main__":
    main()
