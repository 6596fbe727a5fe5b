#!/usr/bin/env python3
"""Checks the Grafana dashboard and the alert rules against the code (run by .ci/run).

* deploy/grafana/firemode.json parses, has unique panel ids, and every query uses the
  dashboard's datasource variable;
* every series named in a PromQL selector (`name{...}`) in the dashboard or in
  deploy/prometheus/alerts.yml is one FireMode exports (a `counter!`, `gauge!` or
  `histogram!` call in supervisor/, workers/ or telemetry/; a histogram also as
  `_bucket`, `_sum`, `_count`), a `process_*` series of the metrics-process crate, or one
  Prometheus adds to every scrape (`up`, `scrape_*`).

So renaming a metric in the code, or a panel for a series that does not exist, fails CI.
Standard library only; no Rust build, no Prometheus.
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["supervisor", "workers", "telemetry"]
DASHBOARD = ROOT / "deploy/grafana/firemode.json"
RULES = ROOT / "deploy/prometheus/alerts.yml"
# Series Prometheus itself attaches to every scraped target.
SYNTHETIC = {
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
}
# The standard process series, recorded by the metrics-process crate at every scrape
# (telemetry/src/lib.rs, render_metrics): their names are the crate's, not in our code.
PROCESS = {
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_virtual_memory_bytes",
    "process_virtual_memory_max_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_threads",
}
EMITTED = re.compile(r'\b(counter|gauge|histogram)!\(\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"')
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{")
TEMPLATE = re.compile(r"\{\{.*?\}\}", re.S)  # Go templates in annotations: not PromQL


def exported_series():
    names = set(SYNTHETIC) | PROCESS
    for top in SOURCES:
        for path in (ROOT / top).rglob("*.rs"):
            for kind, name in EMITTED.findall(path.read_text(encoding="utf-8")):
                names.add(name)
                if kind == "histogram":
                    names.update(name + s for s in ("_bucket", "_sum", "_count"))
    return names


def dashboard_exprs(problems):
    try:
        dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        problems.append(f"{DASHBOARD.relative_to(ROOT)}: not valid JSON: {e}")
        return []
    ids, exprs = set(), []
    for panel in dash.get("panels", []):
        pid = panel.get("id")
        if pid in ids:
            problems.append(f"dashboard: panel id {pid} used twice")
        ids.add(pid)
        for target in panel.get("targets", []):
            if target.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"dashboard: panel {panel.get('title')!r} does not use ${{datasource}}")
            exprs.append((f"panel {panel.get('title')!r}", target.get("expr", "")))
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            exprs.append((f"variable {var.get('name')!r}", query.get("query", "")))
    if not exprs:
        problems.append("dashboard: no queries found")
    return exprs


def main():
    problems = []
    known = exported_series()
    if len(known) <= len(SYNTHETIC) + len(PROCESS):
        problems.append(f"no metric calls found under {SOURCES}: is the checkout complete?")
    where = dashboard_exprs(problems)
    where.append((str(RULES.relative_to(ROOT)), RULES.read_text(encoding="utf-8")))
    for place, text in where:
        for name in sorted(set(SELECTOR.findall(TEMPLATE.sub(" ", text))) - known):
            problems.append(f"{place}: series {name!r} is not exported by FireMode")
    for p in problems:
        print(f"check_series: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"check_series: dashboard and alert rules use only exported series ({len(where) - 1} dashboard queries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
