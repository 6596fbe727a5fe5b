"""A spread-out variant of the original load test (tests/load/locustfile.py).

The same tasks and weights (10 / 5 / 2: classify, sync a batch with a fresh Idempotency-Key,
fetch an offline bundle failing any response over 50 MB), but over five catalog items and
200 sessions instead of the original's one item and one hot session. At the end it prints the p95 of POST /v1/classify and makes the
run fail when it is above 300 ms (the original non-functional requirement).

The token comes from FM_TOKEN, or is minted with `firemode token` (FM_BIN points
at the binary; default ./target/release/firemode).
"""
import os
import random
import subprocess
import uuid

from locust import HttpUser, between, events, task

MAX_BUNDLE_BYTES = 50 * 1024 * 1024
P95_LIMIT_MS = 300

ITEMS = [
    ("FE-DCP", "pressure_low"),
    ("FE-DCP", "service_tag_missing"),
    ("FE-CO2", "horn_damaged"),
    ("HR", "hose_kinked"),
    ("FB", "pull_tabs_damaged"),
]


def _token():
    token = os.environ.get("FM_TOKEN")
    if token:
        return token.strip()
    binary = os.environ.get("FM_BIN", "./target/release/firemode")
    args = [binary, "token", "--sub", "locust", "--org", "loadtest", "--ttl", "2h"]
    config = os.environ.get("FM_CONFIG")
    if config:
        args += ["--config", config]
    return subprocess.check_output(args, text=True).strip()


TOKEN = _token()


class Technician(HttpUser):
    wait_time = between(0.5, 1.5)

    def on_start(self):
        self.client.headers.update({"Authorization": f"Bearer {TOKEN}"})
        self.session_id = f"load-{random.randint(1, 200)}"

    @task(10)
    def classify(self):
        item, condition = random.choice(ITEMS)
        self.client.post(
            "/v1/classify",
            json={"item_code": item, "observed_condition": condition},
            name="/v1/classify",
        )

    @task(5)
    def sync_results(self):
        payload = {
            "changes": [
                {"op": "set", "path": f"/extinguishers/FE-{random.randint(1, 50):02d}/pressure",
                 "value": random.choice(["ok", "low", "high"])}
            ],
            "_sync_meta": {"vector_clock": {}},
        }
        self.client.post(
            f"/v1/tests/sessions/{self.session_id}/results",
            json=payload,
            headers={"Idempotency-Key": str(uuid.uuid4())},
            name="/v1/tests/sessions/{id}/results",
        )

    @task(2)
    def offline_bundle(self):
        with self.client.get(
            f"/v1/tests/sessions/{self.session_id}/offline_bundle",
            name="/v1/tests/sessions/{id}/offline_bundle",
            catch_response=True,
        ) as resp:
            if len(resp.content) > MAX_BUNDLE_BYTES:
                resp.failure(f"bundle of {len(resp.content)} bytes is over 50 MB")
            elif resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
            else:
                resp.success()


@events.quitting.add_listener
def check_p95(environment, **_kwargs):
    stats = environment.stats.get("/v1/classify", "POST")
    p95 = stats.get_response_time_percentile(0.95) if stats.num_requests else float("inf")
    print(f"POST /v1/classify: {stats.num_requests} requests, {stats.num_failures} failures, p95 {p95} ms (limit {P95_LIMIT_MS} ms)")
    if p95 > P95_LIMIT_MS or environment.stats.total.fail_ratio > 0:
        environment.process_exit_code = 1
