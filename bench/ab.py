#!/usr/bin/env python3
"""A/B of two FireMode builds: classify through the front, interleaved rounds, one run.

Starts both builds side by side (embedded store, 2 classify instances each, JWT on) and
alternates oha runs between them, so machine noise hits both alike. Prints req/s, p99, the
front's CPU per request and its RSS of each, and the ratios B/A. How BENCHMARKS.md's before/after
figures were measured.

    bench/ab.py DIR_A DIR_B [--rounds 4] [--duration 8] [--conns 64,500] [--rust-log LEVEL] [--tool oha|wrk]

Both builds run the shipped defaults (RUST_LOG unset) unless --rust-log is given; the
override is printed first.

DIR_A and DIR_B each hold `firemode`, `firemode-classify` and `firemode-sync` (e.g. copies
of target/release/ before and after a change). Needs oha (cargo install oha), or wrk with
`--tool wrk` (bench/classify.lua, the load bench/run.py puts on the proxies).
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import SECRET, cpu_seconds, median, oha, rss_mib, wrk  # noqa: E402


def start(bin_dir, work, front, admin, rust_log):
    os.makedirs(work, exist_ok=True)
    cfg = os.path.join(work, "firemode.toml")
    with open(cfg, "w") as f:
        f.write(f"""data_dir = "{work}/data"
[server]
listen = "{front}"
admin_listen = "{admin}"
[supervisor]
runtime_dir = "{work}/run"
[workers.classify]
instances = 2
[workers.sync]
instances = 1
[auth]
jwt_secret = "{SECRET}"
""")
    log = open(os.path.join(work, "firemode.log"), "w")
    env = dict(os.environ)
    env.pop("RUST_LOG", None)
    if rust_log:
        env["RUST_LOG"] = rust_log
    proc = subprocess.Popen([os.path.join(bin_dir, "firemode"), "--config", cfg], stderr=log, env=env)
    end = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://{admin}/readyz", timeout=2)
            break
        except Exception:
            if time.time() > end or proc.poll() is not None:
                raise SystemExit(f"{bin_dir}: firemode did not become ready (see {work}/firemode.log)")
            time.sleep(0.1)
    token = subprocess.run([os.path.join(bin_dir, "firemode"), "token", "--sub", "bench", "--org", "bench",
                            "--config", cfg], capture_output=True, text=True, check=True).stdout.strip()
    return proc, token


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--conns", default="64,500")
    ap.add_argument("--tool", choices=("oha", "wrk"), default="oha",
                    help="load generator: oha (default) or wrk with bench/classify.lua")
    ap.add_argument("--rust-log", default=None,
                    help="RUST_LOG for both builds; unset (the shipped default) unless given")
    args = ap.parse_args()
    print("settings: shipped defaults" + (f", override RUST_LOG={args.rust_log}" if args.rust_log else
                                          " (RUST_LOG unset)") + f"; load: {args.tool}", flush=True)
    work = tempfile.mkdtemp(prefix="fm-ab-")
    builds = {}
    try:
        for i, (name, d) in enumerate((("A", args.a), ("B", args.b))):
            front, admin = f"127.0.0.1:{28280 + i}", f"127.0.0.1:{29290 + i}"
            proc, token = start(os.path.abspath(d), os.path.join(work, name), front, admin, args.rust_log)
            tokens = os.path.join(work, name, "tokens.txt")
            with open(tokens, "w") as f:
                f.write(token + "\n")
            builds[name] = dict(proc=proc, token=token, front=front, tokens=tokens)
        results = {}
        for conns in [int(c) for c in args.conns.split(",")]:
            for rnd in range(args.rounds):
                order = ("A", "B") if rnd % 2 == 0 else ("B", "A")
                for name in order:
                    b = builds[name]
                    before = cpu_seconds(b["proc"].pid)
                    if args.tool == "wrk":
                        r = wrk(f"http://{b['front']}", conns, args.duration, b["tokens"])
                    else:
                        r = oha(f"http://{b['front']}/v1/classify", conns, args.duration,
                                ["-H", f"Authorization: Bearer {b['token']}"])
                    r["cpu_us"] = (cpu_seconds(b["proc"].pid) - before) / max(r["ok"], 1) * 1e6
                    r["rss"] = rss_mib(b["proc"].pid)
                    results.setdefault((name, conns), []).append(r)
                    print(f"round {rnd + 1} c={conns:>3} {name}: {r['rps']:>8.0f} req/s  p99 {r['p99_ms']:.2f} ms  "
                          f"front CPU {r['cpu_us']:.1f} µs/req  RSS {r['rss']:.1f} MiB  failed {r['failed']}", flush=True)
    finally:
        for b in builds.values():
            b["proc"].send_signal(signal.SIGTERM)
            b["proc"].wait(timeout=60)

    print("\n| conns | build | req/s | p99 ms | front CPU µs/req | front RSS MiB (max) |\n|---|---|---|---|---|---|")
    for (name, conns), rs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"| {conns} | {name} | {median([r['rps'] for r in rs]):.0f} | {median([r['p99_ms'] for r in rs]):.2f} "
              f"| {median([r['cpu_us'] for r in rs]):.1f} | {max(r['rss'] for r in rs):.1f} |")
    for conns in sorted({c for _, c in results}):
        m = {n: {k: median([r[k] for r in results[(n, conns)]]) for k in ("rps", "p99_ms", "cpu_us")} for n in "AB"}
        print(f"c={conns}: B/A throughput {m['B']['rps'] / m['A']['rps']:.2f}x, "
              f"p99 {m['B']['p99_ms'] / m['A']['p99_ms']:.2f}x, CPU per request {m['B']['cpu_us'] / m['A']['cpu_us']:.2f}x")


if __name__ == "__main__":
    main()
