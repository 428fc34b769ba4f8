"""kgate as an nginx plugin versus nginx alone versus kgate's built-in proxy, side by side on the simulator.

    python bench/plugin_bench.py [--duration 8] [--runs 3] [--connections 1,32] [--nginx-workers 1]

Starts a Redis, `kgate simulate` and one `kgate serve` (bench/gateway_bench.py's policy: three budgets on
three windows enforced for the caller) serving both its client listener and the decision API on a unix
socket, and two nginx: a plain reverse proxy to the simulator (no plugin), and deploy/nginx/nginx.conf (the
plugin, kgate.lua) rendered by tests/nginxutil.py with its upstream `sim` pointing at the simulator. Both
nginx get ``--nginx-workers`` workers (default 1, to compare with the one kgate process). wrk (required)
drives JSON and streaming chat completions at each ``--connections``. Each run goes simulator, then the
other three in an order rotated by one every run (as gateway_bench rotates its gateways). Prints per case
req/s, p50/p99 latency, non-2xx (medians over ``--runs``), each case's throughput as a fraction of the
simulator's (median of the ratios of a run to the simulator run beside it), the p50 latency added at one
connection, and the CPU time per request (from /proc) of each process involved: the simulator, nginx's
workers, kgate, its Redis; "gateway" is the proxying processes' sum (nginx+plugin: nginx workers + kgate).
Afterwards it checks that every request got a 2xx and that kgate's audit log holds a record for the
plugin's requests (the ids nginx logged): the plugin's requests are metered, not passed through.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

import gateway_bench as gb  # noqa: E402
import nginxutil  # noqa: E402

CASES = ("simulator", "nginx-alone", "builtin-proxy", "nginx+plugin")
# The processes whose CPU a case is charged with (its "gateway" column), and all those it involves.
GATEWAY = {"simulator": ("sim",), "nginx-alone": ("nginx",), "builtin-proxy": ("kgate",),
           "nginx+plugin": ("nginx", "kgate")}
INVOLVED = {"simulator": ("sim",), "nginx-alone": ("nginx", "sim"), "builtin-proxy": ("kgate", "redis", "sim"),
            "nginx+plugin": ("nginx", "kgate", "redis", "sim")}
COLUMNS = ("nginx", "kgate", "redis", "sim")


def workers_of(proc: subprocess.Popen[bytes], count: int, timeout: float = 10.0) -> list[int]:
    """The pids of a running nginx master's workers (its children), once all ``count`` are there."""
    deadline = time.monotonic() + timeout
    while True:
        kids = [c.pid for c in psutil.Process(proc.pid).children()]
        if len(kids) >= count or time.monotonic() > deadline:
            return kids
        time.sleep(0.05)


def audit_of(audit_dir: Path) -> dict[str, dict]:
    """kgate's audit records by request id (every replica's files; the last record of an id wins)."""
    out: dict[str, dict] = {}
    for f in sorted(audit_dir.rglob("audit-*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out[rec["request_id"]] = rec
    return out


def measure(args: argparse.Namespace, conns_list: list[int], urls: dict[str, str],
            pids: dict[str, dict[str, list[int]]], tmp: Path) -> tuple[dict[str, dict], dict[str, float]]:
    results: dict[str, dict] = {}
    ratios: dict[str, float] = {}
    seconds = max(1, round(args.duration))  # what run_wrk asks wrk for
    for mode, body in (("json", gb.BODY), ("stream", gb.STREAM_BODY)):
        for conns in conns_list:
            runs: dict[str, list[dict]] = {case: [] for case in CASES}
            for i in range(args.runs):
                others = list(CASES[1:])
                for case in ("simulator", *others[i % 3:], *others[:i % 3]):
                    cpu0 = {g: sum(map(gb.cpu_seconds, ps)) for g, ps in pids[case].items()}
                    r = gb.run_wrk(urls[case] + "/v1/chat/completions", body, conns, args.duration, tmp)
                    time.sleep(0.2)  # the plugin's settles of the last requests, before the next case
                    served = r["rps"] * seconds
                    r["cpu"] = {g: (sum(map(gb.cpu_seconds, ps)) - cpu0[g]) * 1e6 / served if served else 0.0
                                for g, ps in pids[case].items()}
                    r["cpu_us"] = sum(r["cpu"][g] for g in GATEWAY[case])
                    runs[case].append(r)
            for case, rs in runs.items():
                med = {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50_ms", "p99_ms", "cpu_us")}
                med["cpu"] = {g: statistics.median(r["cpu"][g] for r in rs) for g in INVOLVED[case]}
                med["non2xx"] = sum(r["non2xx"] for r in rs)
                results[f"{case}/{mode}/c{conns}"] = med
                if case != "simulator":
                    ratios[f"{case}/{mode}/c{conns}"] = statistics.median(
                        c["rps"] / s["rps"] for c, s in zip(rs, runs["simulator"], strict=True))
            ratios[f"plugin-vs-builtin/{mode}/c{conns}"] = statistics.median(
                p["rps"] / b["rps"] for p, b in zip(runs["nginx+plugin"], runs["builtin-proxy"], strict=True))
    return results, ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    ap.add_argument("--runs", type=int, default=3, help="runs per case (medians are reported)")
    ap.add_argument("--connections", default="1,32")
    ap.add_argument("--nginx-workers", type=int, default=1, help="worker_processes of both nginx (default 1)")
    ap.add_argument("--json-out", help="write the results as JSON here too")
    args = ap.parse_args()
    conns_list = [int(c) for c in args.connections.split(",")]
    if shutil.which("wrk") is None:
        ap.error("wrk is not installed (apt-get install wrk); this benchmark needs it")
    try:
        nginxutil.nginx_binary()
    except (pytest.skip.Exception, pytest.fail.Exception) as exc:
        ap.error(f"no usable nginx: {exc.msg}")
    tmp = Path(tempfile.mkdtemp(prefix="kgate-plugin-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    nginxes: list[subprocess.Popen[bytes]] = []
    redis = gb.RedisServer(port=0, appendonly=False)
    redis.start_sync()
    try:
        sim_port, gw_port, admin_port, plain_port, plugin_port = (gb.free_port() for _ in range(5))
        sim_addr, sock = f"127.0.0.1:{sim_port}", tmp / "kgate.sock"
        env = {**os.environ, "KGATE_LOG_LEVEL": "WARNING"}
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway", "simulate", "--listen", sim_addr,
                                       "--output-tokens", "16"], cwd=ROOT, env=env))
        pol = gb.policy(f"http://{sim_addr}", redis.url, tmp / "data")
        assert set(pol["upstreams"]) == {"sim"}, "nginxutil names the plugin's upstream block `sim`"
        pol["server"] = {"drain_seconds": 5}  # bounds a stop that waits for a request never settled
        (tmp / "bench.yaml").write_text(yaml.safe_dump(pol))
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(tmp / "bench.yaml"),
                                       "--listen", f"127.0.0.1:{gw_port}", "--admin-listen",
                                       f"127.0.0.1:{admin_port}", "--store", redis.url,
                                       "--decision-listen", f"unix:{sock}"], cwd=ROOT, env=env))
        asyncio.run(gb.wait_ready(f"http://{sim_addr}/_sim/health"))
        asyncio.run(gb.wait_ready(f"http://127.0.0.1:{gw_port}/readyz"))
        nginxes.append(nginxutil.start_nginx(tmp / "nginx-alone", nginxutil.render_plain_config(
            port=plain_port, upstream=sim_addr, workers=args.nginx_workers), plain_port))
        plugin_prefix = tmp / "nginx-plugin"
        nginxes.append(nginxutil.start_nginx(plugin_prefix, nginxutil.render_config(
            plugin_prefix, port=plugin_port, upstream=sim_addr, decision=f"unix:{sock}",
            workers=args.nginx_workers, log_level="warn"), plugin_port))
        plain_workers, plugin_workers = (workers_of(p, args.nginx_workers) for p in nginxes)
        sim, kgate, red = [procs[0].pid], [procs[1].pid], [redis.pid or 0]
        pids = {"simulator": {"sim": sim}, "nginx-alone": {"nginx": plain_workers, "sim": sim},
                "builtin-proxy": {"kgate": kgate, "redis": red, "sim": sim},
                "nginx+plugin": {"nginx": plugin_workers, "kgate": kgate, "redis": red, "sim": sim}}
        urls = {"simulator": f"http://{sim_addr}", "nginx-alone": f"http://127.0.0.1:{plain_port}",
                "builtin-proxy": f"http://127.0.0.1:{gw_port}", "nginx+plugin": f"http://127.0.0.1:{plugin_port}"}
        results, ratios = measure(args, conns_list, urls, pids, tmp)
        plugin = nginxutil.Nginx(urls["nginx+plugin"], plugin_prefix, nginxes[1])
        for p in reversed(nginxes):  # the plugin's nginx first: its workers send their last settles as they stop
            nginxutil.stop(p)
        procs[1].terminate()  # kgate: writes what is left of its audit log
        procs[1].wait(timeout=30)
        logged = plugin.access_log()
        ids = {rid for _, _, rid in logged if rid != "-"}
        records = audit_of(tmp / "data" / "audit")
        metered = [records[rid] for rid in ids if rid in records]
        no_id = Counter(str(status) for _, status, rid in logged if rid == "-")
        audit: dict[str, Any] = {
            "plugin_requests": len(logged), "with_request_id": len(ids), "audit_records": len(metered),
            "charged": sum(1 for r in metered if r.get("usage")), "all_audit_records": len(records),
            "without_id_by_status": dict(no_id)}
        nginx_errors = plugin.lua_errors()
    finally:
        for p in nginxes:
            nginxutil.stop(p)
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + 15  # for all of them together
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
            if p.poll() is None:
                p.kill()
                p.wait()
        redis.stop_sync()
        redis.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"nginx: {args.nginx_workers} worker process(es) each (nginx alone and nginx+plugin); one kgate "
          f"process (client listener + decision API on a unix socket); redis {redis.version}")
    print(f"load generator: wrk; {args.runs} runs of {args.duration:g} s per case, simulator first, the other "
          "three rotating; medians")
    print(f"{'case':<28}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>8}   CPU us/req: "
          f"{'gateway':>8}" + "".join(f"{c:>7}" for c in COLUMNS))
    for name, r in results.items():
        cols = "".join(f"{r['cpu'][c]:>7.0f}" if c in r["cpu"] else f"{'-':>7}" for c in COLUMNS)
        print(f"{name:<28}{r['rps']:>9.0f}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['non2xx']:>8}"
              f"{'':>15}{r['cpu_us']:>8.0f}{cols}")
    print()
    added: dict[str, float] = {}
    for mode in ("json", "stream"):
        for conns in conns_list:
            key = f"{mode}/c{conns}"
            parts = [f"{case} {ratios[f'{case}/{key}']:.1%}" for case in CASES[1:]]
            print(f"{mode:>6} c{conns:<3} throughput / simulator (median of pairs): {', '.join(parts)}; "
                  f"nginx+plugin / built-in proxy {ratios[f'plugin-vs-builtin/{key}']:.1%}")
            if conns == 1:
                sim_p50 = results[f"simulator/{key}"]["p50_ms"]
                for case in CASES[1:]:
                    added[f"{case}/{key}"] = results[f"{case}/{key}"]["p50_ms"] - sim_p50
                print(f"{'':>11} added p50 vs the simulator: " + ", ".join(
                    f"{case} +{added[f'{case}/{key}']:.3f} ms" for case in CASES[1:]))
    print(f"\nplugin metering: nginx logged {audit['plugin_requests']} requests, {audit['with_request_id']} with "
          f"a kgate request id; kgate's audit log has {audit['audit_records']} records for them "
          f"({audit['charged']} with usage charged; {audit['all_audit_records']} records in all, the built-in "
          f"proxy's too); without an id, by status: {audit['without_id_by_status'] or 'none'} (499: wrk cut the "
          "request off at the end of a run, before nginx answered)")
    bad = [name for name, r in results.items() if r["non2xx"]]
    if bad:
        print(f"\n!!! WARNING: non-2xx answers in {', '.join(bad)}: those figures are not comparable !!!")
    unmetered = audit["with_request_id"] - audit["audit_records"] + sum(
        n for status, n in no_id.items() if status != "499")
    if audit["audit_records"] == 0 or unmetered:
        print(f"\n!!! WARNING: {unmetered} of the plugin's answered requests have no audit record in kgate "
              "(passed unmetered, or never settled) !!!")
    if nginx_errors:
        print(f"\n!!! WARNING: {len(nginx_errors)} plugin/nginx errors in the error log, e.g.:")
        for line in nginx_errors[:5]:
            print("    " + line[:300])
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "nginx_workers": args.nginx_workers, "results": results, "ratios": ratios, "added_p50_ms": added,
            "audit": audit, "nginx_errors": nginx_errors}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
