"""Server-side latency from a FireMode /metrics scrape (stdin): per front route, the request
count and the p50/p95/p99 read off the `http_request_duration_seconds` histogram, plus the
sync workers' own merge time (`sync_latency_seconds`). Each percentile is the upper bound of
the bucket it falls in. run.sh prints this after Locust's figures, which also count the time
the Python client itself takes on a loaded machine.

    curl -s http://127.0.0.1:9090/metrics | python3 tests/load/server_latency.py
"""
import collections
import re
import sys

LINE = re.compile(r'^(\w+)_bucket\{(.*)\} (\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def percentile(buckets, q):
    """buckets: {le: cumulative count}; the smallest le holding a q share of the requests."""
    ordered = sorted(buckets.items())
    total = ordered[-1][1] if ordered else 0
    for le, n in ordered:
        if total and n >= q * total:
            return le
    return float("nan")


def main():
    series = collections.defaultdict(lambda: collections.defaultdict(float))
    for line in sys.stdin:
        m = LINE.match(line.strip())
        if not m:
            continue
        name, labels, value = m.group(1), dict(LABEL.findall(m.group(2))), float(m.group(3))
        le = float("inf") if labels.get("le") == "+Inf" else float(labels.get("le", "nan"))
        if name == "http_request_duration_seconds" and "kind" not in labels:
            key = f'{labels.get("method")} {labels.get("endpoint")}'
        elif name == "sync_latency_seconds":
            key = "sync worker merge (inside the worker)"
        else:
            continue
        series[key][le] += value
    print("Server-side latency (bucket upper bounds):")
    for key, buckets in sorted(series.items()):
        count = max(buckets.values())
        p50, p95, p99 = (percentile(buckets, q) * 1000 for q in (0.50, 0.95, 0.99))
        print(f"  {key}: {count:.0f} requests, p50 <= {p50:g} ms, p95 <= {p95:g} ms, p99 <= {p99:g} ms")


if __name__ == "__main__":
    main()
