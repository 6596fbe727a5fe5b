#!/usr/bin/env python3
"""FireMode sync benchmark: the sync targets of the design (§6) at the size of a site.

1. Merge latency against session size: sessions pre-filled to 100, 1,000, 5,000 and 20,000
   paths, then one-path merges (a `set` of one existing path, a fresh Idempotency-Key each,
   one at a time, closed loop), sizes interleaved round by round, on SQLite and on
   PostgreSQL. Target: median at 20,000 paths ≤ 2.0 × the median at 100, on both stores.
2. Hot session against many sessions (PostgreSQL): N clients for a fixed time posting
   one-path merges, (a) all to one session, (b) each to its own. Target: hot/many ≥ 0.5.
3. Delta bytes: in the 20,000-path session, `GET …/changes?since=<clock before>` after 1, 10
   and 100 changes against the full `GET` of the session. Target: < 4 KB after one change.
4. Waiter wake-up: 1,000 long-polls (`wait=30`) held on one session, then one merge; for
   each waiter the time from the merge's response to its own. Target: within 250 ms.

    bench/sync.py [--bin-dir target/release] [--rounds 4] [--quick]

Three FireModes run side by side: the embedded SQLite store; PostgreSQL with the planner statistics
the server leaves (the PostgreSQL these figures came from runs autovacuum = off, so a fresh
database has none; the setting is printed); and PostgreSQL where the benchmark runs ANALYZE once after the fill
(`--no-analysed` leaves that one out). Part 2 and part 4 use the first PostgreSQL.

All three run the shipped defaults: the config sets only the listen addresses, data_dir,
runtime_dir, the JWT secret and (PostgreSQL) the database URL; RUST_LOG, DATABASE_URL,
PORT, FIREMODE_* and OTEL_* are removed from their environment. Anything else is printed
as an override beside the figures. Part 4 reads its 1,000 sockets from one thread through
epoll: 1,000 threads blocked in http.client took ~430 ms on 2 cores to notice answers sent
within 60 ms, more than the target itself.

Needs PostgreSQL at TEST_DATABASE_URL (default host=127.0.0.1 port=5432 user=postgres
dbname=postgres; trust auth) and psql; creates and drops its own databases. Python 3.11
standard library only. Not part of the test suite. Run it on an otherwise idle machine.
"""
import argparse
import http.client
import json
import math
import os
import random
import re
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "bench-secret-0123456789abcdef0123456789"
FILL_BATCH = 500
# What the supervisor and the sync worker allow (supervisor/src/fleet.rs,
# workers/store/src/watch.rs); printed beside part 4.
LONG_POLLS_PER_INSTANCE = 4096
WAITERS_PER_WORKER = 100_000


# ---------------------------------------------------------------- small helpers

def median(xs):
    return statistics.median(xs) if xs else float("nan")


def pctl(xs, q):
    """Nearest-rank percentile."""
    s = sorted(xs)
    if not s:
        return float("nan")
    return s[max(0, math.ceil(q * len(s)) - 1)]


def ms(seconds):
    return seconds * 1000.0


def uptime():
    with open("/proc/loadavg") as f:
        return "load average " + ", ".join(f.read().split()[:3])


def cpu_threads(pid):
    """CPU time of each thread of a process (ns resolution, from schedstat), by thread id."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[(pid, tid)] = int(f.read().split()[0]) / 1e9
        except OSError:
            pass
    return out


def cpu_delta(before, after):
    """CPU spent between two cpu_threads() snapshots; a thread that appeared counts from 0
    (a thread that exited in between is missed: tokio's threads live for the whole run)."""
    return sum(v - before.get(k, 0.0) for k, v in after.items())


def path_of(i):
    return f"/items/IT-{i:05d}/status"


def git(*args):
    return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------- HTTP

class Conn:
    """One keep-alive connection to the front; reconnects (and resends) once when the
    server closed it. Merges carry an Idempotency-Key, so a resend is safe."""

    def __init__(self, addr, token, timeout=120):
        self.host, self.port = addr.rsplit(":", 1)
        self.auth = f"Bearer {token}"
        self.timeout = timeout
        self.c = None
        self.reconnects = 0

    def request(self, method, path, body=None, headers=None):
        h = {"Authorization": self.auth}
        if body is not None:
            h["Content-Type"] = "application/json"
        h.update(headers or {})
        for attempt in (0, 1):
            if self.c is None:
                self.c = http.client.HTTPConnection(self.host, int(self.port), timeout=self.timeout)
            t0 = time.perf_counter()
            try:
                self.c.request(method, path, body=body, headers=h)
                r = self.c.getresponse()
                data = r.read()
                return r.status, data, time.perf_counter() - t0
            except (http.client.HTTPException, OSError):
                self.c.close()
                self.c = None
                if attempt:
                    raise
                self.reconnects += 1
        raise AssertionError("unreachable")

    def close(self):
        if self.c:
            self.c.close()
            self.c = None


class Replica:
    """A device: a stable replica_id, the clock it last saw per session, a fresh
    Idempotency-Key per batch. Its batches name what it has seen and leave its own entry
    out, so the server numbers them."""

    def __init__(self, conn, replica_id):
        self.conn = conn
        self.rid = replica_id
        self.clocks = {}
        self.n = 0

    def merge(self, sid, changes):
        seen = {k: v for k, v in self.clocks.get(sid, {}).items() if k != self.rid}
        body = json.dumps({"changes": changes, "_sync_meta": {"vector_clock": seen, "replica_id": self.rid}},
                          separators=(",", ":")).encode()
        status, data, dt = self.conn.request("POST", f"/v1/tests/sessions/{sid}/results", body,
                                             {"Idempotency-Key": f"{self.rid}-{uuid.uuid4().hex}"})
        if status == 200:
            self.clocks[sid] = json.loads(data)["vector_clock"]
        return status, dt, data

    def set_one(self, sid, i):
        self.n += 1
        return self.merge(sid, [{"op": "set", "path": path_of(i), "value": f"{self.rid}-{self.n}"}])


def changes_path(sid, since, wait=None):
    q = "since=" + urllib.parse.quote(json.dumps(since, separators=(",", ":")), safe="")
    if wait is not None:
        q += f"&wait={wait}"
    return f"/v1/tests/sessions/{sid}/changes?{q}"


# ---------------------------------------------------------------- FireMode

class FireMode:
    def __init__(self, label, bin_dir, work, front, admin, pg=None, analyze=False):
        self.label, self.bin_dir = label, bin_dir
        self.work = os.path.join(work, re.sub(r"\W+", "-", label))
        self.front, self.admin, self.pg, self.analyze = front, admin, pg, analyze
        self.db_url = pg.url if pg else None
        self.proc = None
        self.token = None

    def start(self):
        os.makedirs(self.work)
        cfg = os.path.join(self.work, "firemode.toml")
        db = f'[database]\nurl = "{self.db_url}"\n' if self.db_url else ""
        with open(cfg, "w") as f:
            f.write(f"""data_dir = "{self.work}/data"
[server]
listen = "{self.front}"
admin_listen = "{self.admin}"
[supervisor]
runtime_dir = "{self.work}/run"
[auth]
jwt_secret = "{SECRET}"
{db}""")
        env = {k: v for k, v in os.environ.items()
               if k not in ("RUST_LOG", "DATABASE_URL", "PORT") and not k.startswith(("FIREMODE_", "OTEL_"))}
        self.log = open(os.path.join(self.work, "firemode.log"), "w")
        self.proc = subprocess.Popen([os.path.join(self.bin_dir, "firemode"), "--config", cfg],
                                     stdout=self.log, stderr=self.log, env=env)
        end = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://{self.admin}/readyz", timeout=2)
                break
            except Exception:
                if time.time() > end or self.proc.poll() is not None:
                    raise SystemExit(f"{self.label}: firemode did not become ready (see {self.work}/firemode.log)")
                time.sleep(0.1)
        self.token = subprocess.run([os.path.join(self.bin_dir, "firemode"), "token", "--sub", "bench", "--org",
                                     "bench", "--ttl", "12h", "--config", cfg], env=env,
                                    capture_output=True, text=True, check=True).stdout.strip()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def conn(self, timeout=120):
        return Conn(self.front, self.token, timeout)

    def admin_get(self, path):
        with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=10) as r:
            return r.read().decode()

    def sync_pids(self):
        st = json.loads(self.admin_get("/status"))
        return [i["pid"] for i in st["instances"] if i["kind"] == "sync" and i.get("pid")]

    def gauge(self, name):
        total = 0.0
        for line in self.admin_get("/metrics").splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total


class Postgres:
    def __init__(self, server, suffix):
        self.server = server
        self.db = f"fm_syncbench_{os.getpid()}_{suffix}"
        self.url = re.sub(r"dbname=\S+", f"dbname={self.db}", server) if "dbname=" in server \
            else f"{server} dbname={self.db}"

    def psql(self, sql):
        return subprocess.run(["psql", self.server, "-Atqc", sql], capture_output=True, text=True,
                              check=True).stdout

    def create(self):
        self.psql(f"CREATE DATABASE {self.db}")

    def drop(self):
        subprocess.run(["psql", self.server, "-qc", f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)"])

    def setting(self, name):
        return self.psql(f"SHOW {name}").strip()

    def analyze(self):
        subprocess.run(["psql", self.url, "-qc", "ANALYZE"], check=True)

    def backend_pids(self):
        out = self.psql(f"SELECT pid FROM pg_stat_activity WHERE datname = '{self.db}'")
        return [int(p) for p in out.split()]


class Cpu:
    """CPU spent by the sync workers (and, on PostgreSQL, the database's backends) over a
    stretch of the run."""

    def __init__(self, fm):
        self.fm, self.pg = fm, fm.pg
        self.workers = fm.sync_pids()
        self.w0 = self.snapshot(self.workers)
        self.b0 = self.snapshot(self.backends())

    def backends(self):
        return self.pg.backend_pids() if self.pg else []

    @staticmethod
    def snapshot(pids):
        out = {}
        for p in pids:
            out.update(cpu_threads(p))
        return out

    def done(self):
        w = cpu_delta(self.w0, self.snapshot(self.workers))
        b = cpu_delta(self.b0, self.snapshot(self.backends()))
        return w, b


def fill(fm, sid, size, rid="fill"):
    rep = Replica(fm.conn(), rid)
    for start in range(0, size, FILL_BATCH):
        changes = [{"op": "set", "path": path_of(i), "value": "ok"} for i in range(start, min(size, start + FILL_BATCH))]
        status, _, data = rep.merge(sid, changes)
        if status != 200:
            raise SystemExit(f"{fm.label}: fill of {sid} failed: {status} {data[:300]!r}")
    rep.conn.close()


# ---------------------------------------------------------------- part 1

def part1(stores, sizes, rounds, per_round, prefix, rng):
    sessions = {}
    for fm in stores:
        for size in sizes:
            sid = f"{prefix}-p{size}"
            t0 = time.perf_counter()
            fill(fm, sid, size)
            print(f"[1] {fm.label}: filled {sid} with {size} paths in {time.perf_counter() - t0:.1f} s", flush=True)
            sessions[(fm.label, size)] = sid
        if fm.analyze:
            fm.pg.analyze()
            print(f"[1] {fm.label}: ANALYZE run on {fm.pg.db}", flush=True)
    reps = {fm.label: Replica(fm.conn(), "bench-m") for fm in stores}
    lat = {}      # (store, size) -> [seconds]
    rnd_med = {}  # (store, size) -> [per-round median]
    gets = {}     # (store, size) -> [full GET seconds]
    cpu = {}      # (store, size) -> [worker s, backend s, merges]
    statuses = {}
    # Warm-up: 5 merges and a GET per session, not counted.
    for fm in stores:
        for size in sizes:
            for _ in range(5):
                reps[fm.label].set_one(sessions[(fm.label, size)], rng.randrange(size))
            c = fm.conn()
            c.request("GET", f"/v1/tests/sessions/{sessions[(fm.label, size)]}")
            c.close()
    for r in range(rounds):
        order = sizes[r % len(sizes):] + sizes[:r % len(sizes)]
        for fm in (stores if r % 2 == 0 else stores[::-1]):
            rep = reps[fm.label]
            for size in order:
                sid = sessions[(fm.label, size)]
                c = Cpu(fm)
                xs = []
                for _ in range(per_round):
                    status, dt, _ = rep.set_one(sid, rng.randrange(size))
                    statuses.setdefault((fm.label, size), {}).setdefault(status, 0)
                    statuses[(fm.label, size)][status] += 1
                    if status == 200:
                        xs.append(dt)
                w, b = c.done()
                acc = cpu.setdefault((fm.label, size), [0.0, 0.0, 0])
                acc[0] += w
                acc[1] += b
                acc[2] += len(xs)
                for _ in range(3):
                    status, _, dt = rep.conn.request("GET", f"/v1/tests/sessions/{sid}")
                    if status == 200:
                        gets.setdefault((fm.label, size), []).append(dt)
                lat.setdefault((fm.label, size), []).extend(xs)
                rnd_med.setdefault((fm.label, size), []).append(median(xs))
                print(f"[1] round {r + 1} {fm.label:<10} {size:>6} paths: median {ms(median(xs)):6.2f} ms  "
                      f"p95 {ms(pctl(xs, 0.95)):6.2f} ms  statuses {statuses[(fm.label, size)]}", flush=True)
    return dict(lat=lat, rnd_med=rnd_med, gets=gets, cpu=cpu, statuses=statuses, sessions=sessions,
                reconnects=sum(r.conn.reconnects for r in reps.values()))


def report1(res, stores, sizes, rounds, per_round):
    lo, hi = sizes[0], sizes[-1]
    out = [f"### 1. Merge latency against session size ({rounds} interleaved rounds × {per_round} "
           "one-path merges per size, closed loop, one client)\n",
           "| store | paths | merges | median ms | p95 ms | per-round medians ms | full GET median ms "
           "| sync worker CPU µs/merge | PostgreSQL CPU µs/merge |",
           "|---|---|---|---|---|---|---|---|---|"]
    for fm in stores:
        for size in sizes:
            k = (fm.label, size)
            xs = res["lat"].get(k, [])
            w, b, n = res["cpu"].get(k, [0, 0, 0])
            pgcpu = f"{b / max(n, 1) * 1e6:.0f}" if fm.db_url else "—"
            out.append(f"| {fm.label} | {size:,} | {len(xs)} | {ms(median(xs)):.2f} | {ms(pctl(xs, 0.95)):.2f} "
                       f"| {' / '.join('%.2f' % ms(x) for x in res['rnd_med'].get(k, []))} "
                       f"| {ms(median(res['gets'].get(k, []))):.2f} | {w / max(n, 1) * 1e6:.0f} | {pgcpu} |")
    out.append("")
    ratios = {}
    for fm in stores:
        a, z = res["lat"].get((fm.label, lo), []), res["lat"].get((fm.label, hi), [])
        ratio = median(z) / median(a)
        per = [y / x for x, y in zip(res["rnd_med"][(fm.label, lo)], res["rnd_med"][(fm.label, hi)])]
        ratios[fm.label] = ratio
        verdict = "holds" if ratio <= 2.0 else "does NOT hold"
        out.append(f"* {fm.label}: median at {hi:,} / median at {lo:,} paths = **{ratio:.2f}** "
                   f"(per round {min(per):.2f}–{max(per):.2f}); target ≤ 2.0: {verdict}")
    bad = {k: v for k, v in res["statuses"].items() if set(v) != {200}}
    if bad:
        out.append("* non-200 answers: " + "; ".join(f"{k[0]} {k[1]:,} paths: {counts(v)}" for k, v in bad.items()))
    if res["reconnects"]:
        out.append(f"* client reconnects: {res['reconnects']}")
    return "\n".join(out), ratios


# ---------------------------------------------------------------- part 2

def run_clients(fm, clients, targets, duration):
    """clients threads, client i merging path i of session targets[i] until the deadline."""
    reps = [Replica(fm.conn(), f"c{i}") for i in range(clients)]
    for i, rep in enumerate(reps):  # connect and learn the clock, outside the measured time
        rep.set_one(targets[i], i)
    results = [[] for _ in range(clients)]
    errors = [dict() for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def run(i):
        rep, res = reps[i], results[i]
        barrier.wait()
        while True:
            try:
                status, dt, _ = rep.set_one(targets[i], i)
            except Exception as e:  # noqa: BLE001 - counted, not fatal
                status, dt = type(e).__name__, 0.0
            end = time.perf_counter()
            if end > stop_at[0]:
                break
            if status == 200:
                res.append(dt)
            else:
                errors[i][status] = errors[i].get(status, 0) + 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    cpu = Cpu(fm)
    client0 = time.process_time()
    stop_at[0] = time.perf_counter() + duration
    barrier.wait()
    for t in threads:
        t.join()
    w, b = cpu.done()
    client = time.process_time() - client0
    for rep in reps:
        rep.conn.close()
    lat = [x for r in results for x in r]
    errs = {}
    for e in errors:
        for k, v in e.items():
            errs[k] = errs.get(k, 0) + v
    return dict(rps=len(lat) / duration, p50=median(lat), p95=pctl(lat, 0.95), p99=pctl(lat, 0.99), n=len(lat),
                errors=errs, worker_us=w / max(len(lat), 1) * 1e6, pg_us=b / max(len(lat), 1) * 1e6,
                client_us=client / max(len(lat), 1) * 1e6)


def part2(fm, clients, duration, rounds, prefix):
    paths = max(100, clients)
    hot = f"{prefix}-hot"
    fill(fm, hot, paths)
    many = [f"{prefix}-many-{i}" for i in range(clients)]
    for sid in many:
        fill(fm, sid, paths)
    print(f"[2] {fm.label}: filled 1 + {clients} sessions with {paths} paths each", flush=True)
    cases = {"hot": [hot] * clients, "many": many}
    res = {"hot": [], "many": []}
    for r in range(rounds):
        for name in (("hot", "many") if r % 2 == 0 else ("many", "hot")):
            x = run_clients(fm, clients, cases[name], duration)
            res[name].append(x)
            print(f"[2] round {r + 1} {name:<4}: {x['rps']:7.1f} merges/s  p50 {ms(x['p50']):6.1f} ms  "
                  f"p95 {ms(x['p95']):6.1f} ms  p99 {ms(x['p99']):6.1f} ms  errors {x['errors']}  "
                  f"worker {x['worker_us']:.0f} µs/merge  PostgreSQL {x['pg_us']:.0f} µs/merge  "
                  f"client {x['client_us']:.0f} µs/merge", flush=True)
    return res, paths


def report2(res, label, clients, duration, rounds, paths):
    out = [f"### 2. Hot session against many sessions ({label}, {clients} clients closed loop, {rounds} "
           f"interleaved rounds of {duration} s, each session {paths} paths, client i sets path i)\n",
           "| case | merges/s (median) | per round | p50 ms | p95 ms | p99 ms | errors | sync worker CPU µs/merge "
           "| PostgreSQL CPU µs/merge | client CPU µs/merge |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    m = {}
    for name, title in (("hot", "(a) all on one session"), ("many", "(b) one session each")):
        rs = res[name]
        m[name] = median([x["rps"] for x in rs])
        errs = {}
        for x in rs:
            for k, v in x["errors"].items():
                errs[k] = errs.get(k, 0) + v
        per_round = " / ".join(f"{x['rps']:.0f}" for x in rs)
        out.append(f"| {title} | {m[name]:.0f} | {per_round} "
                   f"| {ms(median([x['p50'] for x in rs])):.1f} | {ms(median([x['p95'] for x in rs])):.1f} "
                   f"| {ms(median([x['p99'] for x in rs])):.1f} | {counts(errs)} "
                   f"| {median([x['worker_us'] for x in rs]):.0f} | {median([x['pg_us'] for x in rs]):.0f} "
                   f"| {median([x['client_us'] for x in rs]):.0f} |")
    ratio = m["hot"] / m["many"]
    per = [h["rps"] / n["rps"] for h, n in zip(res["hot"], res["many"])]
    out.append(f"\n* hot/many = **{ratio:.2f}** (per round {min(per):.2f}–{max(per):.2f}); target ≥ 0.5: "
               f"{'holds' if ratio >= 0.5 else 'does NOT hold'}")
    return "\n".join(out), ratio


# ---------------------------------------------------------------- part 3

def part3(fm, sid, size, ks, rng):
    rep = Replica(fm.conn(), "bench-d")
    conn = rep.conn
    rows = []
    status, full, full_dt = conn.request("GET", f"/v1/tests/sessions/{sid}")
    assert status == 200, (status, full[:200])
    clock = json.loads(full)["vector_clock"]
    rep.clocks[sid] = clock
    status, empty, empty_dt = conn.request("GET", changes_path(sid, clock))
    rows.append(dict(k=0, delta=len(empty), full=len(full), delta_ms=ms(empty_dt), full_ms=ms(full_dt), n=0))
    for k in ks:
        status, full, full_dt = conn.request("GET", f"/v1/tests/sessions/{sid}")
        before = json.loads(full)["vector_clock"]
        for i in rng.sample(range(size), k):
            s, _, data = rep.set_one(sid, i)
            assert s == 200, (s, data[:200])
        status, delta, delta_dt = conn.request("GET", changes_path(sid, before))
        assert status == 200, (status, delta[:200])
        n = len(json.loads(delta)["changes"])
        rows.append(dict(k=k, delta=len(delta), full=len(full), delta_ms=ms(delta_dt), full_ms=ms(full_dt), n=n))
        print(f"[3] {fm.label}: after {k} changes: delta {len(delta)} B ({n} changes, {ms(delta_dt):.1f} ms) "
              f"vs full {len(full)} B ({ms(full_dt):.1f} ms)", flush=True)
    conn.close()
    return rows


def report3(all_rows, size):
    out = [f"### 3. Delta bytes in the {size:,}-path session (response bodies, uncompressed)\n",
           "| store | changes since the clock | `changes` bytes | changes listed | full `GET` bytes | delta/full "
           "| `changes` ms | full `GET` ms |",
           "|---|---|---|---|---|---|---|---|"]
    verdicts = {}
    for label, rows in all_rows.items():
        for r in rows:
            out.append(f"| {label} | {r['k']} | {r['delta']:,} | {r['n']} | {r['full']:,} | {r['delta'] / r['full']:.5f} "
                       f"| {r['delta_ms']:.1f} | {r['full_ms']:.1f} |")
        one = [r for r in rows if r["k"] == 1]
        if one:
            verdicts[label] = one[0]["delta"]
    out.append("")
    for label, b in verdicts.items():
        out.append(f"* {label}: after one change the delta is **{b:,} B**; target < 4 KB (4,096 B): "
                   f"{'holds' if b < 4096 else 'does NOT hold'}")
    return "\n".join(out), verdicts


# ---------------------------------------------------------------- part 4

class RawAnswer:
    """One HTTP/1.1 answer read from a non-blocking socket: when it arrived, its status, its
    body (Content-Length or chunked)."""

    def __init__(self, name):
        self.name = name
        self.buf = b""
        self.first = None
        self.done = None
        self.status = None
        self.body = b""
        self.error = None

    def feed(self, data, now):
        if self.first is None:
            self.first = now
        if not data:
            self.error = self.error or "connection closed before the answer"
            self.done = now
            return
        self.buf += data
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self.buf[:head_end].decode("latin-1").split("\r\n")
        self.status = int(head[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in head[1:] if ":" in h)}
        rest = self.buf[head_end + 4:]
        if "content-length" in fields:
            if len(rest) >= int(fields["content-length"]):
                self.body, self.done = rest[:int(fields["content-length"])], now
        elif fields.get("transfer-encoding", "").lower() == "chunked" and rest.endswith(b"0\r\n\r\n"):
            body, i = b"", 0
            while True:
                j = rest.index(b"\r\n", i)
                n = int(rest[i:j].split(b";")[0], 16)
                if n == 0:
                    break
                body += rest[j + 2:j + 2 + n]
                i = j + 2 + n + 2
            self.body, self.done = body, now


def part4(fm, sid, size, waiters, rng):
    """`waiters` long-polls on raw sockets, read by one thread through epoll (selectors), so
    each answer is timestamped when it arrives; then one merge on a socket of the same loop.
    (Threads blocked in http.client were tried first: on this 2-core machine, 1,000 of them
    took ~430 ms to observe 1,000 answers that a separate process sent within 35–60 ms; this
    loop observes them within the sending time.)"""
    conn = fm.conn()
    status, full, _ = conn.request("GET", f"/v1/tests/sessions/{sid}")
    conn.close()
    clock = json.loads(full)["vector_clock"]
    target = rng.randrange(size)
    host, port = fm.front.rsplit(":", 1)
    get = (f"GET {changes_path(sid, clock, wait=30)} HTTP/1.1\r\nHost: {fm.front}\r\n"
           f"Authorization: Bearer {fm.token}\r\n\r\n").encode()
    sel = selectors.DefaultSelector()
    answers = []
    for i in range(waiters):
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        answers.append((sock, RawAnswer(i)))
    t_send = time.perf_counter()
    for sock, a in answers:
        sock.sendall(get)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, a)
    pending = len(answers)

    def pump(timeout):
        nonlocal pending
        for key, _ in sel.select(timeout=timeout):
            now = time.perf_counter()
            try:
                data = key.fileobj.recv(65536)
            except OSError as e:
                key.data.error, data = repr(e), b""
            key.data.feed(data, now)
            if key.data.done is not None:
                sel.unregister(key.fileobj)
                key.fileobj.close()
                pending -= 1

    held = 0.0
    next_look = 0.0
    while time.perf_counter() - t_send < 20:
        pump(0.02)
        if time.perf_counter() >= next_look:
            held = fm.gauge("sync_long_polls_waiting")
            next_look = time.perf_counter() + 0.1
            if held >= waiters:
                break
    t_held = time.perf_counter() - t_send
    settle = time.perf_counter() + 0.5
    while time.perf_counter() < settle:
        pump(0.05)
    early = sum(1 for _, a in answers if a.done is not None)
    body = json.dumps({"changes": [{"op": "set", "path": path_of(target), "value": f"wake-{uuid.uuid4().hex[:8]}"}],
                       "_sync_meta": {"vector_clock": clock, "replica_id": "bench-w"}}, separators=(",", ":")).encode()
    post = (f"POST /v1/tests/sessions/{sid}/results HTTP/1.1\r\nHost: {fm.front}\r\n"
            f"Authorization: Bearer {fm.token}\r\nIdempotency-Key: bench-w-{uuid.uuid4().hex}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    msock = socket.create_connection((host, int(port)), timeout=10)
    msock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    merge = RawAnswer("merge")
    t_merge_sent = time.perf_counter()
    msock.sendall(post)
    msock.setblocking(False)
    sel.register(msock, selectors.EVENT_READ, merge)
    pending += 1
    deadline = time.perf_counter() + 90
    while pending and time.perf_counter() < deadline:
        pump(1.0)
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    sel.close()
    lat, bad = [], {}
    want = path_of(target)
    for _, a in answers:
        if a.done is None or a.error or a.status is None:
            k = a.error or "no answer within 90 s of the merge"
        elif a.status != 200:
            k = str(a.status)
        else:
            try:
                changes = json.loads(a.body).get("changes", [])
            except ValueError:
                changes = []
            if any(c.get("path") == want for c in changes):
                lat.append(a.done - merge.done if merge.done else float("nan"))
                continue
            k = "200 without the change" + (" (before the merge)" if a.done < t_merge_sent else "")
        bad[k] = bad.get(k, 0) + 1
    merge_ms = ms(merge.done - t_merge_sent) if merge.done else float("nan")
    x = dict(size=size, waiters=waiters, held=held, t_held=t_held, merge_status=merge.status, merge_ms=merge_ms,
             lat=lat, bad=bad, early=early)
    print(f"[4] {fm.label} {size} paths: {int(held)} held after {t_held:.1f} s; merge {merge.status} in {merge_ms:.1f} ms; "
          f"woken {len(lat)}: median {ms(median(lat)):.1f} ms p95 {ms(pctl(lat, 0.95)):.1f} ms "
          f"max {ms(max(lat)) if lat else float('nan'):.1f} ms; failed {bad or 0}", flush=True)
    return x


def counts(d):
    return ", ".join(f"{k}: {v}" for k, v in sorted(d.items(), key=lambda kv: str(kv[0]))) or "0"


def report4(rows, waiters, nofile_note):
    out = [f"### 4. Waiter wake-up: {waiters:,} long-polls (`wait=30`) on one session, then one merge\n",
           "Time from the merge's answer to each waiter's answer, both as complete at the client (one epoll loop reads all sockets).\n",
           "| store | session paths | held before the merge | merge ms | woken with the change | median ms | p95 ms "
           "| max ms | failed |",
           "|---|---|---|---|---|---|---|---|---|"]
    verdicts = {}
    for label, x in rows:
        lat = x["lat"]
        mx = ms(max(lat)) if lat else float("nan")
        out.append(f"| {label} | {x['size']:,} | {int(x['held'])} (after {x['t_held']:.1f} s) | {x['merge_ms']:.1f} "
                   f"| {len(lat)} | {ms(median(lat)):.1f} | {ms(pctl(lat, 0.95)):.1f} | {mx:.1f} | {counts(x['bad'])} |")
        verdicts[(label, x["size"])] = (len(lat) == x["waiters"] and mx <= 250, mx)
    out.append("")
    for (label, size), (ok, mx) in verdicts.items():
        out.append(f"* {label}, {size:,} paths: slowest waiter {mx:.0f} ms after the merge's answer; target: all "
                   f"within 250 ms: {'holds' if ok else 'does NOT hold'}")
    out.append(f"* limits: {nofile_note}")
    return "\n".join(out), verdicts


# ---------------------------------------------------------------- main

def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return f"open files {soft} (enough; not changed)"
    new = need if hard == resource.RLIM_INFINITY else min(hard, max(need, soft))
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return f"OVERRIDE: open-files soft limit raised {soft} → {new} for the benchmark and FireMode (inherited)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--merges", type=int, default=25, help="one-path merges per size per round (part 1)")
    ap.add_argument("--sizes", default="100,1000,5000,20000")
    ap.add_argument("--clients", type=int, default=32, help="part 2")
    ap.add_argument("--duration", type=int, default=10, help="seconds per case per round (part 2)")
    ap.add_argument("--waiters", type=int, default=1000, help="part 4")
    ap.add_argument("--waiter-sizes", default="100,1000,20000", help="session sizes for part 4 (each must be in --sizes)")
    ap.add_argument("--parts", default="1,2,3,4", help="parts 3 and 4 run part 1 first (it fills the sessions)")
    ap.add_argument("--no-analysed", action="store_true",
                    help="leave out the third store (PostgreSQL with ANALYZE run after the fill)")
    ap.add_argument("--quick", action="store_true", help="a small smoke run (1 round, small sessions, 100 waiters)")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.merges, a.sizes, a.clients, a.duration = 1, 10, "100,2000", 8, 3
        a.waiters, a.waiter_sizes = 100, "100,2000"
    sizes = sorted(int(s) for s in a.sizes.split(","))
    wsizes = [int(s) for s in a.waiter_sizes.split(",") if int(s) in sizes]
    parts = {int(p) for p in a.parts.split(",")}
    bin_dir = os.path.abspath(a.bin_dir)
    for b in ("firemode", "firemode-sync", "firemode-classify"):
        if not os.access(os.path.join(bin_dir, b), os.X_OK):
            raise SystemExit(f"{bin_dir}/{b} is missing: cargo build --release")
    nofile_note = raise_nofile(2 * a.waiters + 1024)
    limits_note = (f"{nofile_note}; the front holds up to {LONG_POLLS_PER_INSTANCE:,} long-polls per sync instance on "
                   f"connections of their own (2 instances by default) and a sync worker up to "
                   f"{WAITERS_PER_WORKER:,} waiters: no config override needed for {a.waiters:,} waiters; a held "
                   f"request at the session clock reads only the session's head when it arrives, and the waiters "
                   f"woken by one merge share one read of the session, through the worker's pool "
                   f"(database.pool_size, 16 by default; not overridden)")
    commit = git("rev-parse", "--short", "HEAD")
    dirty = " (+ uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    version = subprocess.run([os.path.join(bin_dir, "firemode"), "--version"], capture_output=True,
                             text=True).stdout.strip()
    server = os.environ.get("TEST_DATABASE_URL", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    pg = Postgres(server, "a")
    pg_an = None if a.no_analysed else Postgres(server, "b")
    autovacuum = pg.setting("autovacuum")
    settings = [
        f"commit {commit}{dirty} (binaries: `{version}`, {bin_dir})",
        f"machine: {os.cpu_count()} cores; {uptime()} at the start",
        "FireMode: shipped defaults (2 classify + 2 sync instances, database.pool_size 16, RUST_LOG unset); the "
        "config sets only server.listen, server.admin_listen, data_dir, supervisor.runtime_dir, auth.jwt_secret and "
        "(PostgreSQL) database.url; RUST_LOG, DATABASE_URL, PORT, FIREMODE_* and OTEL_* removed from its environment",
        f"PostgreSQL {pg.setting('server_version')} on `{server}` (autovacuum = {autovacuum}): throwaway databases "
        f"`{pg.db}`" + (f" and `{pg_an.db}`" if pg_an else "") + ", dropped after",
    ]
    if pg_an:
        settings.append(f"OVERRIDE (store, not FireMode): \"PostgreSQL, analysed\" is a second FireMode on "
                        f"`{pg_an.db}`, where the benchmark runs ANALYZE once after filling the part-1 sessions; "
                        f"\"PostgreSQL\" keeps the planner statistics the server left (autovacuum = {autovacuum})")
    settings += [
        f"part 1: sizes {', '.join(f'{s:,}' for s in sizes)}; {a.rounds} rounds × {a.merges} merges per size; "
        f"part 2: {a.clients} clients × {a.duration} s × {a.rounds} rounds; part 4: {a.waiters:,} waiters "
        f"on sessions of {', '.join(f'{s:,}' for s in wsizes)} paths",
        nofile_note,
    ]
    print("settings:\n" + "\n".join(f"  {s}" for s in settings), flush=True)
    rng = random.Random(42)
    work = tempfile.mkdtemp(prefix="fm-sync-")
    prefix = f"b{int(time.time())}"
    stores = [FireMode("SQLite", bin_dir, work, "127.0.0.1:28380", "127.0.0.1:29390"),
              FireMode("PostgreSQL", bin_dir, work, "127.0.0.1:28381", "127.0.0.1:29391", pg)]
    if pg_an:
        stores.append(FireMode("PostgreSQL, analysed", bin_dir, work, "127.0.0.1:28382", "127.0.0.1:29392", pg_an,
                               analyze=True))
    reports, loads = [], []
    try:
        for fm in stores:
            if fm.pg:
                fm.pg.create()
            fm.start()
        sessions = {}
        if parts & {1, 3, 4}:
            res1 = part1(stores, sizes, a.rounds, a.merges, prefix, rng)
            sessions = res1["sessions"]
            loads.append(f"after part 1: {uptime()}")
            reports.append(report1(res1, stores, sizes, a.rounds, a.merges)[0])
        if 2 in parts:
            res2, paths = part2(stores[1], a.clients, a.duration, a.rounds, prefix)
            loads.append(f"after part 2: {uptime()}")
            reports.append(report2(res2, stores[1].label, a.clients, a.duration, a.rounds, paths)[0])
        if 3 in parts:
            rows = {fm.label: part3(fm, sessions[(fm.label, sizes[-1])], sizes[-1], (1, 10, 100), rng)
                    for fm in stores}
            loads.append(f"after part 3: {uptime()}")
            reports.append(report3(rows, sizes[-1])[0])
        if 4 in parts:
            rows4 = []
            for size in wsizes:
                for fm in stores[:2]:
                    rows4.append((fm.label, part4(fm, sessions[(fm.label, size)], size, a.waiters, rng)))
                    time.sleep(1)
            loads.append(f"after part 4: {uptime()}")
            reports.append(report4(rows4, a.waiters, limits_note)[0])
    finally:
        for fm in stores:
            fm.stop()
            if fm.pg:
                fm.pg.drop()
    print("\n## Results\n")
    print("\n".join(f"* {s}" for s in settings + loads + [f"FireMode logs: {work}"]))
    for r in reports:
        print()
        print(r)

if __name__ == "__main__":
    sys.exit(main())
