#!/usr/bin/env python3
"""FireMode benchmark: one run, one machine, figures as ratios.

Measures classify (a) directly on one worker socket, (b) through the FireMode front (with
JWT), (c) through nginx proxying to the same worker sockets with keep-alive, (d) through a
bare hyper proxy (supervisor/examples/bare_proxy.rs: the floor for any hyper front); at 64 and 500
connections, in interleaved rounds; then classify at a fixed 5,000 requests/s; sync merges
against PostgreSQL at the rate of 500 Locust users and closed loop (many sessions, one hot
session); restart-to-ready of a SIGKILLed
instance; RSS of every process; CPU each process spent per request.

    bench/run.py [--rounds 4] [--duration 10] [--quick]

Needs: oha (cargo install oha), wrk and nginx (apt-get install wrk nginx), PostgreSQL at
TEST_DATABASE_URL (default host=127.0.0.1 user=postgres). Not part of the test suite.
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRONT = "127.0.0.1:28080"
ADMIN = "127.0.0.1:29090"
NGINX = "127.0.0.1:28081"
BARE = "127.0.0.1:28082"
SECRET = "bench-secret-0123456789abcdef0123456789"
BODY = '{"item_code":"FE-DCP","observed_condition":"pressure_low"}'
CLK_TCK = os.sysconf("SC_CLK_TCK")


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def admin(path):
    with urllib.request.urlopen(f"http://{ADMIN}{path}", timeout=5) as r:
        return json.loads(r.read())


def wait_ready(timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            urllib.request.urlopen(f"http://{ADMIN}/readyz", timeout=2)
            return
        except Exception:
            time.sleep(0.1)
    raise SystemExit("firemode did not become ready")


def oha(target, conns, duration, extra=(), unix=None, rate=None):
    args = ["oha", "--no-tui", "--output-format", "json", "-z", f"{duration}s", "-c", str(conns),
            "-m", "POST", "-T", "application/json", "-d", BODY, *extra]
    if unix:
        args += ["--unix-socket", unix]
    if rate:
        args += ["-q", str(rate)]
    args.append(target)
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    j = json.loads(out)
    summary = j["summary"]
    pct = j.get("latencyPercentiles", {})
    codes = j.get("statusCodeDistribution", {})
    ok = int(codes.get("200", 0))
    total = sum(int(v) for v in codes.values())
    return {
        "rps": summary["requestsPerSec"],
        "p50_ms": pct.get("p50", float("nan")) * 1000,
        "p99_ms": pct.get("p99", float("nan")) * 1000,
        "ok": ok,
        # oha cancels the requests in flight when the duration ends: not failures.
        "failed": total - ok + sum(int(v) for k, v in j.get("errorDistribution", {}).items()
                                   if "deadline" not in k.lower()),
    }


def start_firemode(work, db_url):
    cfg = os.path.join(work, "firemode.toml")
    with open(cfg, "w") as f:
        f.write(f"""data_dir = "{work}/data"
[server]
listen = "{FRONT}"
admin_listen = "{ADMIN}"
[supervisor]
runtime_dir = "{work}/run"
[supervisor.backoff]
# Each SIGKILL below is a one-off crash, not a crash loop: healthy for 1 s resets backoff.
reset_after = "1s"
[workers.classify]
instances = 2
[workers.sync]
instances = 2
[database]
url = "{db_url}"
pool_size = 16
[auth]
jwt_secret = "{SECRET}"
[telemetry]
log_format = "json"
""")
    env = dict(os.environ, RUST_LOG="warn")
    log = open(os.path.join(work, "firemode.log"), "w")
    proc = subprocess.Popen([f"{ROOT}/target/release/firemode", "--config", cfg], stderr=log, env=env)
    wait_ready()
    token = subprocess.run([f"{ROOT}/target/release/firemode", "token", "--sub", "bench", "--org", "bench",
                            "--ttl", "2h", "--config", cfg], capture_output=True, text=True, check=True).stdout.strip()
    return proc, token


def start_nginx(work, sockets):
    conf = os.path.join(work, "nginx.conf")
    servers = "\n".join(f"    server unix:{s};" for s in sockets)
    with open(conf, "w") as f:
        f.write(f"""user root;
worker_processes auto;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream classify {{
{servers}
    keepalive 64;
  }}
  server {{
    listen {NGINX} backlog=4096;
    location / {{
      proxy_pass http://classify;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
""")
    sh("nginx", "-c", conf, "-p", work)
    time.sleep(0.5)
    with open(f"{work}/nginx.pid") as f:
        master = int(f.read().strip())
    return master


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="1 round of 3 s: a smoke run")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.duration = 1, 3
    for tool in ["oha", "wrk", "nginx"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is required: cargo install oha; apt-get install wrk nginx")
    sh("cargo", "build", "--release", "--quiet", cwd=ROOT)
    sh("cargo", "build", "--release", "--quiet", "--example", "bare_proxy", cwd=ROOT)
    work = tempfile.mkdtemp(prefix="fm-bench-")
    server = os.environ.get("TEST_DATABASE_URL", "host=127.0.0.1 user=postgres dbname=postgres")
    db = f"fm_bench_{os.getpid()}"
    sh("psql", server, "-qc", f"CREATE DATABASE {db}")
    db_url = re.sub(r"dbname=\S+", f"dbname={db}", server)
    fm, token = start_firemode(work, db_url)
    nginx_master = None
    bare = None
    try:
        sockets = sorted(os.path.join(work, "run", s) for s in os.listdir(os.path.join(work, "run"))
                         if s.startswith("classify-") and s.endswith(".sock"))
        nginx_master = start_nginx(work, sockets)
        # The floor: a bare hyper proxy (supervisor/examples/bare_proxy.rs) to the same sockets.
        bare = subprocess.Popen([f"{ROOT}/target/release/examples/bare_proxy", BARE, *sockets])
        time.sleep(0.3)
        workers = children(fm.pid)
        auth = ["-H", f"Authorization: Bearer {token}"]
        cases = {
            "direct": dict(target="http://localhost/v1/classify", unix=sockets[0]),
            "front": dict(target=f"http://{FRONT}/v1/classify", extra=auth),
            "nginx": dict(target=f"http://{NGINX}/v1/classify"),
            "bare": dict(target=f"http://{BARE}/v1/classify"),
        }
        procs = {"front": [fm.pid], "nginx": [nginx_master] + children(nginx_master), "direct": [],
                 "bare": [bare.pid]}
        results = {}
        cpu = {"front": [], "nginx": [], "bare": []}
        for conns in (64, 500):
            for rnd in range(a.rounds):
                for name, case in cases.items():
                    before = {p: cpu_seconds(p) for p in procs[name]}
                    r = oha(case["target"], conns, a.duration, case.get("extra", ()), case.get("unix"))
                    spent = sum(cpu_seconds(p) - before[p] for p in procs[name])
                    if name in cpu and r["ok"]:
                        cpu[name].append(spent / r["ok"] * 1e6)
                    results.setdefault((name, conns), []).append(r)
                    print(f"round {rnd + 1} c={conns:>3} {name:<6} {r['rps']:>9.0f} req/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  failed {r['failed']}", flush=True)
        rss = {"firemode": rss_mib(fm.pid)}
        for w in workers:
            rss[f"worker {w}"] = rss_mib(w)

        fixed = oha(cases["front"]["target"], 500, a.duration, auth, rate=5000)

        # Sync at the rate 500 Locust users offer (the load test's mix: 5 of every 17 tasks
        # are merges, one task per user per ~1 s): 500 connections, each a user waiting
        # 0.5-1.5 x 3.4 s between merges, ~147 merges/s; then the same connections back to
        # back (closed loop) for the capacity.
        env = dict(os.environ, TOKEN=token)
        sync = {}
        for label, sessions, think in (("500 users, many sessions", "500", "3400"),
                                       ("500 users, one hot session", "1", "3400"),
                                       ("closed loop, many sessions", "500", "0"),
                                       ("closed loop, one hot session", "1", "0")):
            env["SESSIONS"], env["THINK_MS"], env["RUN_ID"] = sessions, think, f"r{time.time_ns()}"
            out = subprocess.run(["wrk", "-t2", "-c500", f"-d{a.duration * 2}s", "-s", f"{ROOT}/bench/sync.lua",
                                  f"http://{FRONT}"], capture_output=True, text=True, env=env, check=True).stdout
            m = re.search(r"RESULT (.*)", out)
            kv = dict(x.split("=") for x in m.group(1).split()) if m else {}
            st = re.search(r"STATUSES (\S*)", out)
            kv["statuses"] = st.group(1) if st else "?"
            sync[label] = kv
            print(f"sync {label}: {kv}", flush=True)

        restarts = []
        for _ in range(10):
            inst = [i for i in admin("/status")["instances"] if i["kind"] == "classify" and i["instance"] == 0][0]
            old = inst["pid"]
            t0 = time.time()
            os.kill(old, signal.SIGKILL)
            while True:
                cur = [i for i in admin("/status")["instances"] if i["kind"] == "classify" and i["instance"] == 0][0]
                if cur["state"] == "ready" and cur["pid"] not in (None, old):
                    break
                time.sleep(0.005)
            restarts.append((time.time() - t0) * 1000)
            time.sleep(1.5)
    finally:
        if nginx_master:
            subprocess.run(["nginx", "-c", os.path.join(work, "nginx.conf"), "-p", work, "-s", "stop"])
        if bare:
            bare.kill()
        fm.send_signal(signal.SIGTERM)
        fm.wait(timeout=60)
        subprocess.run(["psql", server, "-qc", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"])

    def med(name, conns, key):
        return median([r[key] for r in results[(name, conns)]])

    print("\n## Results\n")
    print(f"machine: {os.cpu_count()} cores; {a.rounds} interleaved rounds of {a.duration} s per case; medians\n")
    print("| case | conns | req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for conns in (64, 500):
        for name in cases:
            print(f"| {name} | {conns} | {med(name, conns, 'rps'):.0f} | {med(name, conns, 'p50_ms'):.2f} | {med(name, conns, 'p99_ms'):.2f} |")
    print()
    for conns in (64, 500):
        print(f"front/nginx at {conns}: {med('front', conns, 'rps') / med('nginx', conns, 'rps'):.2f}x throughput; "
              f"front/direct: {med('front', conns, 'rps') / med('direct', conns, 'rps'):.2f}x")
    print(f"front/bare hyper proxy at 64: {med('front', 64, 'rps') / med('bare', 64, 'rps'):.2f}x throughput; "
          f"at 500: {med('front', 500, 'rps') / med('bare', 500, 'rps'):.2f}x")
    print(f"\nCPU per proxied request: front {median(cpu['front']):.1f} µs, nginx {median(cpu['nginx']):.1f} µs, "
          f"bare hyper proxy {median(cpu['bare']):.1f} µs (medians); front/bare {median(cpu['front']) / median(cpu['bare']):.2f}x")
    print(f"fixed 5,000 req/s over 500 connections, through the front: achieved {fixed['rps']:.0f} req/s, p99 {fixed['p99_ms']:.2f} ms, failed {fixed['failed']}")
    for label, kv in sync.items():
        if kv:
            rps = int(kv["requests"]) / float(kv["seconds"])
            print(f"sync merges on PostgreSQL, {label}: {rps:.0f} merges/s, p50 {int(kv['p50_us']) / 1000:.1f} ms, "
                  f"p95 {int(kv['p95_us']) / 1000:.1f} ms, p99 {int(kv['p99_us']) / 1000:.1f} ms, errors {kv['errors']}, non-2xx {kv['non2xx']}, statuses {kv['statuses']}")
    print(f"restart-to-ready after SIGKILL: median {median(restarts):.0f} ms, max {max(restarts):.0f} ms (10 kills)")
    print("RSS after the 500-connection runs: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in rss.items()))


if __name__ == "__main__":
    main()
