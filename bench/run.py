#!/usr/bin/env python3
"""FireMode benchmark: what users run, against the best proxies, in one run, as ratios.

FireMode runs as shipped: config/firemode.toml unchanged except the keys that point it at the
bench's ports, database and JWT secret, RUST_LOG unset (--rust-log sets it), no FIREMODE_*
variables. Anything else that deviates is printed beside the figures ("deviations from
shipped defaults", first line of the output, and in results.json / results.md).

Classify in interleaved rounds (the order rotates each round), at 64 and 500 connections:
  front          the FireMode front, one JWT for every request
  front-many     the FireMode front, 512 distinct JWTs (distinct `sub`) rotated per request
  nginx          nginx proxying to the same worker Unix sockets, keep-alive
  haproxy        HAProxy proxying to the same worker Unix sockets, keep-alive
  bare           a bare hyper proxy (supervisor/examples/bare_proxy.rs): the floor for a hyper front
  direct         oha straight on one worker's socket (reference; another load generator)
The proxied cases share one wrk script (bench/classify.lua) and send the same bytes; nginx,
HAProxy and the bare proxy do not check tokens, so the token count does not matter to them.
Then: CPU per proxied request of each proxy process and of the workers, RSS of the supervisor
and every worker at 500 connections, classify at a fixed 5,000 requests/s, sync merges on
PostgreSQL (at the rate of 500 Locust users and closed loop, many sessions and one hot
session), restart-to-ready of a SIGKILLed instance.

    bench/run.py [--rounds 4] [--duration 10] [--quick] [--rust-log LEVEL] [--out DIR] [--no-build]

Needs: wrk, nginx and haproxy (apt-get install wrk nginx haproxy; or HAPROXY=/path), oha
(cargo install oha --locked) for the direct and fixed-rate cases, psql and PostgreSQL at
TEST_DATABASE_URL (default host=127.0.0.1 user=postgres). Not part of the test suite.
"""
import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRONT = "127.0.0.1:28080"
ADMIN = "127.0.0.1:29090"
NGINX = "127.0.0.1:28081"
BARE = "127.0.0.1:28082"
HAPROXY = "127.0.0.1:28083"
SECRET = "bench-secret-0123456789abcdef0123456789"
BODY = '{"item_code":"FE-DCP","observed_condition":"pressure_low"}'
MANY_TOKENS = 512
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Variables that would change what firemode runs: removed from its environment.
ENV_OVERRIDES = ("RUST_LOG", "PORT", "DATABASE_URL", "OTEL_EXPORTER_OTLP_ENDPOINT")
RESTART_DEVIATION = ('restart-to-ready section only: supervisor.backoff.reset_after = "1s" (shipped "30s"), '
                     "so each of its kills is a first crash, not a crash loop")
LABELS = {
    "direct": "direct (oha, one worker socket)",
    "front": "front, 1 token",
    "front-many": f"front, {MANY_TOKENS} tokens",
    "nginx": "nginx",
    "haproxy": "HAProxy",
    "bare": "bare hyper proxy",
}


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_mib(pid, key="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib(pid):
    return status_mib(pid, "VmRSS")


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def admin(path):
    with urllib.request.urlopen(f"http://{ADMIN}{path}", timeout=5) as r:
        return json.loads(r.read())


def wait_ready(proc, log, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"firemode exited ({proc.returncode}); see {log}")
        try:
            urllib.request.urlopen(f"http://{ADMIN}/readyz", timeout=2)
            return
        except Exception:
            time.sleep(0.1)
    raise SystemExit(f"firemode did not become ready; see {log}")


def wait_port(addr, what, proc=None, timeout=10):
    host, port = addr.rsplit(":", 1)
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what} exited ({proc.returncode})")
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} does not listen on {addr}")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


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


def wrk(target, conns, duration, tokens_file):
    """Classify through a TCP proxy with bench/classify.lua: tokens from tokens_file, round robin."""
    env = dict(os.environ, TOKENS_FILE=tokens_file, BODY=BODY)
    args = ["wrk", f"-t{min(2, conns)}", f"-c{conns}", f"-d{duration}s", "--timeout", "10s",
            "-s", os.path.join(ROOT, "bench", "classify.lua"), target]
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=True).stdout
    m = re.search(r"RESULT (.*)", out)
    if not m:
        raise SystemExit(f"wrk printed no RESULT line:\n{out}")
    kv = {k: float(v) for k, v in (x.split("=") for x in m.group(1).split())}
    errors = kv["connect"] + kv["read"] + kv["write"] + kv["timeout"]
    return {
        "rps": kv["requests"] / kv["seconds"],
        "p50_ms": kv["p50_us"] / 1000,
        "p99_ms": kv["p99_us"] / 1000,
        "ok": int(kv["requests"] - kv["non2xx"]),
        "failed": int(kv["non2xx"] + errors),
    }


# --- FireMode as shipped -------------------------------------------------------------------

def shipped_config(path, db_url, extra=()):
    """config/firemode.toml with only the bench's pointers (and `extra` deviations) replaced.

    Relative paths in it (data_dir, runtime_dir) resolve beside `path`, as for a user's copy."""
    with open(os.path.join(ROOT, "config", "firemode.toml")) as f:
        text = f.read()
    pointers = [
        (r'^listen = "[^"]*"', f'listen = "{FRONT}"'),
        (r'^admin_listen = "[^"]*"', f'admin_listen = "{ADMIN}"'),
        (r'^url = ""', f'url = "{db_url}"'),
        (r'^jwt_secret = ""', f'jwt_secret = "{SECRET}"'),
    ]
    for pattern, repl in [*pointers, *extra]:
        text, n = re.subn(pattern, repl, text, flags=re.M)
        if n != 1:
            raise SystemExit(f"config/firemode.toml: expected one line matching {pattern!r}, found {n}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def firemode_env(rust_log):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIREMODE_") and k not in ENV_OVERRIDES}
    if rust_log:
        env["RUST_LOG"] = rust_log
    return env


def start_firemode(cfg, rust_log):
    log = os.path.join(os.path.dirname(cfg), "firemode.log")
    proc = subprocess.Popen([f"{ROOT}/target/release/firemode", "--config", cfg],
                            stderr=open(log, "w"), env=firemode_env(rust_log))
    wait_ready(proc, log)
    return proc


def stop_firemode(proc):
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def many_tokens(minted, count):
    """`count` tokens like `minted` (claims in the same order, only `sub` differs), HS256 with
    the bench secret. Checks first that re-signing `minted` gives firemode's signature."""
    header, payload, signature = minted.split(".")
    if json.loads(b64url_decode(header)).get("alg") != "HS256":
        raise SystemExit(f"firemode token is not HS256: {b64url_decode(header)!r}")

    def sign(h, p):
        return b64url(hmac.new(SECRET.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest())

    if sign(header, payload) != signature:
        raise SystemExit("re-signing firemode's token with the bench secret does not reproduce it")
    claims = json.loads(b64url_decode(payload))
    tokens = []
    for k in range(count):
        p = b64url(json.dumps(dict(claims, sub=f"bench-{k:04d}"), separators=(",", ":")).encode())
        tokens.append(f"{header}.{p}.{sign(header, p)}")
    return tokens


def classify_status(token):
    req = urllib.request.Request(f"http://{FRONT}/v1/classify", data=BODY.encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def instances():
    return admin("/status")["instances"]


# --- the proxies -----------------------------------------------------------------------------

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
    # Idle upstream connections each nginx worker keeps: at 500 client connections, 64
    # closed and reopened worker connections all the time (about 2x the workers' CPU of
    # the same load behind HAProxy); 512 is nginx at its best here. Runs before 2026-11-30
    # 17:00 used 64.
    keepalive 512;
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
    wait_port(NGINX, "nginx")
    with open(f"{work}/nginx.pid") as f:
        master = int(f.read().strip())
    return master


def haproxy_binary():
    return os.environ.get("HAPROXY") or os.environ.get("FM_TEST_HAPROXY") or shutil.which("haproxy")


def start_haproxy(work, sockets):
    """HAProxy to the same sockets: 2 threads (one per core here, as nginx's `auto`), idle
    server connections reused by any client (`http-reuse always`), least-connections."""
    conf = os.path.join(work, "haproxy.cfg")
    servers = "\n".join(f"  server w{i} {s}" for i, s in enumerate(sockets))
    with open(conf, "w") as f:
        f.write(f"""global
  nbthread 2
  maxconn 8192
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
frontend classify
  bind {HAPROXY} backlog 4096
  default_backend classify
backend classify
  balance leastconn
{servers}
""")
    sh(haproxy_binary(), "-c", "-q", "-f", conf)
    log = open(os.path.join(work, "haproxy.log"), "w")
    proc = subprocess.Popen([haproxy_binary(), "-db", "-f", conf], stdout=log, stderr=log)
    wait_port(HAPROXY, "haproxy", proc)
    return proc


def tool_versions():
    def first_line(args):
        r = subprocess.run(args, capture_output=True, text=True)
        return ((r.stdout or "") + (r.stderr or "")).strip().splitlines()[0:1] or ["?"]
    return {
        "wrk": first_line(["wrk", "-v"])[0],
        "oha": first_line(["oha", "--version"])[0],
        "nginx": first_line(["nginx", "-v"])[0],
        "haproxy": first_line([haproxy_binary(), "-v"])[0],
    }


class PeakRss:
    """Highest VmRSS of each pid while running (sampled every 100 ms)."""

    def __init__(self, pids):
        self.pids, self.peak, self._stop = list(pids), {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for p in self.pids:
                try:
                    self.peak[p] = max(self.peak.get(p, 0.0), rss_mib(p))
                except OSError:
                    pass
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# --- the rounds ------------------------------------------------------------------------------

def run_case(case, conns, duration):
    if case["tool"] == "oha":
        return oha(case["target"], conns, duration, unix=case.get("unix"))
    return wrk(case["target"], conns, duration, case["tokens"])


def classify_rounds(cases, worker_pids, rss_pids, a):
    """Every case at 64 then 500 connections, round by round, the order rotating each round.
    Returns the runs per (case, conns) and the peak RSS during the front's 500-connection runs."""
    names = list(cases)
    for name in names:  # warm-up, not counted: connections, caches, page faults
        run_case(cases[name], 64, 1)
    results, peaks = {}, {}
    for conns in (64, 500):
        for rnd in range(a.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in order:
                case = cases[name]
                before = {p: cpu_seconds(p) for p in case["procs"] + worker_pids}
                sampling = name.startswith("front") and conns == 500
                with PeakRss(rss_pids if sampling else []) as peak:
                    r = run_case(case, conns, a.duration)
                if sampling:
                    for p, v in peak.peak.items():
                        peaks[p] = max(peaks.get(p, 0.0), v)
                spent = {p: cpu_seconds(p) - before[p] for p in before}
                ok = max(r["ok"], 1)
                r["proxy_cpu_us"] = sum(spent[p] for p in case["procs"]) / ok * 1e6 if case["procs"] else None
                r["worker_cpu_us"] = sum(spent[p] for p in worker_pids) / ok * 1e6
                results.setdefault((name, conns), []).append(r)
                cpu = f"  proxy CPU {r['proxy_cpu_us']:.1f} µs/req" if r["proxy_cpu_us"] is not None else ""
                print(f"round {rnd + 1} c={conns:>3} {name:<10} {r['rps']:>9.0f} req/s  p50 {r['p50_ms']:.2f} ms  "
                      f"p99 {r['p99_ms']:.2f} ms{cpu}  workers {r['worker_cpu_us']:.1f} µs/req  failed {r['failed']}",
                      flush=True)
    return results, peaks


def sync_runs(token, duration):
    # Sync at the rate 500 Locust users offer (the load test's mix: 5 of every 17 tasks are
    # merges, one task per user per ~1 s): 500 connections, each a user waiting 0.5-1.5 x
    # 3.4 s between merges, ~147 merges/s; then the same connections back to back (closed
    # loop) for the capacity.
    env = dict(os.environ, TOKEN=token)
    sync = {}
    for label, sessions, think in (("500 users, many sessions", "500", "3400"),
                                   ("500 users, one hot session", "1", "3400"),
                                   ("closed loop, many sessions", "500", "0"),
                                   ("closed loop, one hot session", "1", "0")):
        env["SESSIONS"], env["THINK_MS"], env["RUN_ID"] = sessions, think, f"r{time.time_ns()}"
        out = subprocess.run(["wrk", "-t2", "-c500", f"-d{duration * 2}s", "-s", f"{ROOT}/bench/sync.lua",
                              f"http://{FRONT}"], capture_output=True, text=True, env=env, check=True).stdout
        m = re.search(r"RESULT (.*)", out)
        kv = dict(x.split("=") for x in m.group(1).split()) if m else {}
        st = re.search(r"STATUSES (\S*)", out)
        kv["statuses"] = st.group(1) if st else "?"
        sync[label] = kv
        print(f"sync {label}: {kv}", flush=True)
    return sync


def restart_runs(kills=10):
    restarts = []
    for _ in range(kills):
        old = [i for i in instances() if i["kind"] == "classify" and i["instance"] == 0][0]["pid"]
        t0 = time.time()
        os.kill(old, signal.SIGKILL)
        while True:
            cur = [i for i in instances() if i["kind"] == "classify" and i["instance"] == 0][0]
            if cur["state"] == "ready" and cur["pid"] not in (None, old):
                break
            time.sleep(0.005)
        restarts.append((time.time() - t0) * 1000)
        time.sleep(1.5)
    return restarts


# --- the report ------------------------------------------------------------------------------

def summarize(results):
    med = {}
    for (name, conns), rs in results.items():
        med[f"{name}@{conns}"] = {
            "case": name, "conns": conns,
            "rps": median([r["rps"] for r in rs]),
            "p50_ms": median([r["p50_ms"] for r in rs]),
            "p99_ms": median([r["p99_ms"] for r in rs]),
            "failed": sum(r["failed"] for r in rs),
            "proxy_cpu_us": median([r["proxy_cpu_us"] for r in rs if r["proxy_cpu_us"] is not None]) if rs[0]["proxy_cpu_us"] is not None else None,
            "worker_cpu_us": median([r["worker_cpu_us"] for r in rs]),
        }
    ratios = {}
    for conns in (64, 500):
        m = {n: med[f"{n}@{conns}"] for n in ("front", "front-many", "nginx", "haproxy", "bare", "direct")}
        best = max(("nginx", "haproxy"), key=lambda n: m[n]["rps"])
        for front in ("front", "front-many"):
            f = m[front]
            ratios[f"{front}@{conns}"] = {
                "best_proxy": best,
                "throughput_vs_best": f["rps"] / m[best]["rps"],
                "p99_vs_best": f["p99_ms"] / m[best]["p99_ms"],
                "throughput_vs_nginx": f["rps"] / m["nginx"]["rps"],
                "p99_vs_nginx": f["p99_ms"] / m["nginx"]["p99_ms"],
                "throughput_vs_haproxy": f["rps"] / m["haproxy"]["rps"],
                "throughput_vs_bare": f["rps"] / m["bare"]["rps"],
                "throughput_vs_direct": f["rps"] / m["direct"]["rps"],
                "cpu_vs_bare": f["proxy_cpu_us"] / m["bare"]["proxy_cpu_us"],
            }
    return med, ratios


def report(r):
    """The result as markdown lines (printed and written to results.md)."""
    med, ratios, a = r["medians"], r["ratios"], r["args"]
    out = [f"deviations from shipped defaults: {'; '.join(r['deviations']) or 'none'}",
           f"bench settings (pointers, not deviations): {'; '.join(r['settings'])}",
           "",
           f"## Results (commit {r['commit']})",
           "",
           f"machine: {os.cpu_count()} cores; {a['rounds']} interleaved rounds of {a['duration']} s per case, "
           f"order rotating; medians. Tools: {', '.join(r['tools'].values())}",
           "",
           "| case | conns | req/s | p50 ms | p99 ms | proxy CPU µs/req | workers CPU µs/req | failed |",
           "|---|---|---|---|---|---|---|---|"]
    for conns in (64, 500):
        for name in LABELS:
            m = med[f"{name}@{conns}"]
            cpu = f"{m['proxy_cpu_us']:.1f}" if m["proxy_cpu_us"] is not None else "–"
            out.append(f"| {LABELS[name]} | {conns} | {m['rps']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
                       f"{cpu} | {m['worker_cpu_us']:.1f} | {m['failed']} |")
    out += ["",
            f"Token count: nginx, HAProxy and the bare proxy do not check tokens; they get the front's one-token "
            f"requests (same bytes), so the {MANY_TOKENS}-token case is the front's only. The front keeps 256 "
            f"verified tokens: {MANY_TOKENS} rotated round robin miss it on nearly every request.",
            ""]
    for conns in (64, 500):
        for front in ("front", "front-many"):
            x, f = ratios[f"{front}@{conns}"], med[f"{front}@{conns}"]
            b, n = med[f"{x['best_proxy']}@{conns}"], med[f"nginx@{conns}"]
            out.append(
                f"{LABELS[front]} at {conns}: {f['rps']:.0f} req/s, p99 {f['p99_ms']:.2f} ms | "
                f"/ best proxy ({LABELS[x['best_proxy']]}, {b['rps']:.0f} req/s, p99 {b['p99_ms']:.2f} ms): "
                f"{x['throughput_vs_best']:.2f}x throughput, p99 {x['p99_vs_best']:.2f}x | "
                f"/ nginx ({n['rps']:.0f} req/s, p99 {n['p99_ms']:.2f} ms): {x['throughput_vs_nginx']:.2f}x, "
                f"p99 {x['p99_vs_nginx']:.2f}x | / HAProxy {x['throughput_vs_haproxy']:.2f}x | "
                f"/ bare {x['throughput_vs_bare']:.2f}x | / direct {x['throughput_vs_direct']:.2f}x")
    out.append("")
    for conns in (64, 500):
        cpu = ", ".join(f"{LABELS[n]} {med[f'{n}@{conns}']['proxy_cpu_us']:.1f} µs"
                        for n in ("front", "front-many", "nginx", "haproxy", "bare"))
        out.append(f"CPU per proxied request at {conns} (the proxy's processes: the supervisor for the front, "
                   f"nginx's master and workers): {cpu}; front/bare "
                   f"{ratios[f'front@{conns}']['cpu_vs_bare']:.2f}x, {MANY_TOKENS} tokens/bare "
                   f"{ratios[f'front-many@{conns}']['cpu_vs_bare']:.2f}x")
    fx = r["fixed"]
    out.append(f"fixed 5,000 req/s over 500 connections, through the front (oha, 1 token): achieved "
               f"{fx['rps']:.0f} req/s, p99 {fx['p99_ms']:.2f} ms, failed {fx['failed']}")
    for label, kv in r["sync"].items():
        if "requests" in kv:
            rps = int(kv["requests"]) / float(kv["seconds"])
            out.append(f"sync merges on PostgreSQL, {label}: {rps:.0f} merges/s, p50 {int(kv['p50_us']) / 1000:.1f} ms, "
                       f"p95 {int(kv['p95_us']) / 1000:.1f} ms, p99 {int(kv['p99_us']) / 1000:.1f} ms, "
                       f"errors {kv['errors']}, non-2xx {kv['non2xx']}, statuses {kv['statuses']}")
    rs = r["restarts"]
    out.append(f"restart-to-ready after SIGKILL: median {median(rs):.0f} ms, max {max(rs):.0f} ms ({len(rs)} kills; "
               f"{RESTART_DEVIATION})")
    sup = r["rss"]["supervisor"]
    out.append(f"RSS at 500 connections (peak during the front's 500-connection runs): supervisor {sup:.1f} MiB "
               f"(target < 40 MiB: {'met' if sup < 40 else 'NOT met'}; VmHWM {r['rss']['supervisor_hwm']:.1f} MiB, "
               f"{r['rss']['supervisor_after']:.1f} MiB once the load stopped), "
               + ", ".join(f"{k} {v:.1f} MiB" for k, v in r["rss"]["workers"].items()))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="1 round of 3 s: a smoke run")
    ap.add_argument("--rust-log", default=None, help="RUST_LOG for firemode; unset (the shipped default) unless given")
    ap.add_argument("--no-build", action="store_true",
                    help="run target/release as it is (default: cargo build --release first)")
    ap.add_argument("--out", default=None, help="where results.json and results.md go (default: the run's temp dir)")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.duration = 1, 3
    for tool in ["oha", "wrk", "nginx", "psql"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is required: cargo install oha --locked; apt-get install wrk nginx haproxy postgresql-client")
    if not haproxy_binary():
        raise SystemExit("haproxy is required: apt-get install haproxy, or HAPROXY=/path/to/haproxy")
    # 500 connections through a proxy: two descriptors each, and more for the proxies.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    deviations = [RESTART_DEVIATION]
    if a.rust_log:
        deviations.append(f"RUST_LOG={a.rust_log} (shipped: unset)")
    dropped = sorted(k for k in os.environ if k.startswith("FIREMODE_") or k in ENV_OVERRIDES)
    settings = [f"server.listen {FRONT}", f"server.admin_listen {ADMIN}", "database.url a fresh PostgreSQL database",
                "auth.jwt_secret the bench secret", "config/firemode.toml otherwise as shipped"]
    if dropped:
        settings.append("removed from firemode's environment: " + ", ".join(dropped))
    print(f"deviations from shipped defaults: {'; '.join(deviations) or 'none'}", flush=True)
    print(f"bench settings (pointers, not deviations): {'; '.join(settings)}", flush=True)

    if not a.no_build:
        sh("cargo", "build", "--release", "--quiet", cwd=ROOT)
        sh("cargo", "build", "--release", "--quiet", "--example", "bare_proxy", cwd=ROOT)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    work = tempfile.mkdtemp(prefix="fm-bench-")
    out_dir = a.out or work
    server = os.environ.get("TEST_DATABASE_URL", "host=127.0.0.1 user=postgres dbname=postgres")
    db = f"fm_bench_{os.getpid()}"
    sh("psql", server, "-qc", f"CREATE DATABASE {db}")
    db_url = re.sub(r"dbname=\S+", f"dbname={db}", server)
    if "dbname=" not in db_url:
        db_url += f" dbname={db}"
    cfg = os.path.join(work, "firemode.toml")
    shipped_config(cfg, db_url)
    fm = start_firemode(cfg, a.rust_log)
    nginx_master = haproxy = bare = None
    result = {"args": vars(a), "commit": commit, "deviations": deviations, "settings": settings,
              "tools": tool_versions(), "cores": os.cpu_count()}
    try:
        minted = subprocess.run([f"{ROOT}/target/release/firemode", "token", "--sub", "bench-0000", "--org", "bench",
                                 "--ttl", "2h", "--config", cfg], capture_output=True, text=True, check=True).stdout.strip()
        tokens = many_tokens(minted, MANY_TOKENS)
        if tokens[0] != minted:
            raise SystemExit("the generated tokens are not shaped as firemode's: the first differs from the minted one")
        for t in (tokens[0], tokens[MANY_TOKENS // 2], tokens[-1]):
            if classify_status(t) != 200:
                raise SystemExit("the front refuses a generated token")
        if classify_status(tokens[1][:-2] + ("AA" if not tokens[1].endswith("AA") else "BB")) != 401:
            raise SystemExit("the front accepts a token with a forged signature: it does not check tokens")
        one_file, many_file = os.path.join(work, "token-1.txt"), os.path.join(work, f"tokens-{MANY_TOKENS}.txt")
        with open(one_file, "w") as f:
            f.write(minted + "\n")
        with open(many_file, "w") as f:
            f.write("\n".join(tokens) + "\n")

        sockets = sorted(os.path.join(work, "run", s) for s in os.listdir(os.path.join(work, "run"))
                         if s.startswith("classify-") and s.endswith(".sock"))
        nginx_master = start_nginx(work, sockets)
        haproxy = start_haproxy(work, sockets)
        bare = subprocess.Popen([f"{ROOT}/target/release/examples/bare_proxy", BARE, *sockets])
        wait_port(BARE, "bare_proxy", bare)
        inst = {f"{i['kind']}-{i['instance']}": i["pid"] for i in instances() if i.get("pid")}
        classify_pids = [p for k, p in inst.items() if k.startswith("classify-")]
        cases = {
            "front": dict(tool="wrk", target=f"http://{FRONT}", tokens=one_file, procs=[fm.pid]),
            "front-many": dict(tool="wrk", target=f"http://{FRONT}", tokens=many_file, procs=[fm.pid]),
            "nginx": dict(tool="wrk", target=f"http://{NGINX}", tokens=one_file,
                          procs=[nginx_master] + children(nginx_master)),
            "haproxy": dict(tool="wrk", target=f"http://{HAPROXY}", tokens=one_file, procs=[haproxy.pid]),
            "bare": dict(tool="wrk", target=f"http://{BARE}", tokens=one_file, procs=[bare.pid]),
            "direct": dict(tool="oha", target="http://localhost/v1/classify", unix=sockets[0], procs=[]),
        }
        results, peaks = classify_rounds(cases, classify_pids, [fm.pid, *inst.values()], a)
        result["rss"] = {"supervisor": peaks.get(fm.pid, float("nan")),
                         "supervisor_hwm": status_mib(fm.pid, "VmHWM"),
                         "supervisor_after": rss_mib(fm.pid),
                         "workers": {k: peaks.get(p, float("nan")) for k, p in sorted(inst.items())}}
        result["runs"] = [dict(r, case=n, conns=c) for (n, c), rs in results.items() for r in rs]
        result["fixed"] = oha(f"http://{FRONT}/v1/classify", 500, a.duration,
                              ["-H", f"Authorization: Bearer {minted}"], rate=5000)
        result["sync"] = sync_runs(minted, a.duration)

        # Restart-to-ready: ten one-off crashes in a row. As shipped, an instance must be
        # healthy for 30 s before its backoff counter starts over, so ten kills 1.5 s apart
        # would measure a crash loop's growing delays; this section alone runs a second
        # supervisor whose counter starts over after 1 s (every kill waits the first delay).
        stop_firemode(fm)
        restart_cfg = os.path.join(work, "restart", "firemode.toml")
        shipped_config(restart_cfg, db_url, [(r'^reset_after = "[^"]*"', 'reset_after = "1s"')])
        fm = start_firemode(restart_cfg, a.rust_log)
        result["restarts"] = restart_runs()
    finally:
        if nginx_master:
            subprocess.run(["nginx", "-c", os.path.join(work, "nginx.conf"), "-p", work, "-s", "stop"])
        for p in (haproxy, bare):
            if p:
                p.kill()
                p.wait()
        if fm.poll() is None:
            stop_firemode(fm)
        subprocess.run(["psql", server, "-qc", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"])

    result["medians"], result["ratios"] = summarize(results)
    lines = report(result)
    print("\n" + "\n".join(lines))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"\nwritten: {out_dir}/results.json, {out_dir}/results.md (logs and configs in {work})")


if __name__ == "__main__":
    main()
