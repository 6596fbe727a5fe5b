"""The original FireMode load test, as the original clients run it.

Every user classifies `AS1851-2012-FE-01` / `pressure_low`, posts the same one-change batch
with a fresh Idempotency-Key to session 123, and fetches session 123's offline bundle
(failing any answer over 50 MB): weights 10 / 5 / 2, a wait of 0.5-1.5 s. Run as the
original did: `locust -f tests/load/locustfile.py --headless -u 500 -r 10 --run-time 2m`.
At the end it prints the p95 of POST /v1/classify and fails the run when it is above
300 ms or any request failed.

The only addition is the token: FM_TOKEN, or one minted with `firemode token` (FM_BIN
points at the binary, default ./target/release/firemode; FM_CONFIG at its config).
A spread-out variant (several items, 200 sessions) is tests/load/spread_locustfile.py.
"""
import os
import subprocess
import uuid

from locust import HttpUser, between, events, task

MAX_BUNDLE_BYTES = 50 * 1024 * 1024
P95_LIMIT_MS = 300


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


class FireModeUser(HttpUser):
    wait_time = between(0.5, 1.5)

    def on_start(self):
        self.client.headers.update({"Authorization": f"Bearer {TOKEN}"})

    @task(10)
    def classify_defect(self):
        self.client.post(
            "/v1/classify",
            json={"item_code": "AS1851-2012-FE-01", "observed_condition": "pressure_low"},
        )

    @task(5)
    def sync_offline_data(self):
        self.client.post(
            "/v1/tests/sessions/123/results",
            json={
                "changes": [{"op": "set", "path": "/test", "value": "data"}],
                "_sync_meta": {"vector_clock": {}},
            },
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )

    @task(2)
    def get_offline_bundle(self):
        with self.client.get(
            "/v1/tests/sessions/123/offline_bundle", catch_response=True
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
    print(
        f"POST /v1/classify: {stats.num_requests} requests, {stats.num_failures} failures, "
        f"p95 {p95} ms (limit {P95_LIMIT_MS} ms)"
    )
    if p95 > P95_LIMIT_MS or environment.stats.total.fail_ratio > 0:
        environment.process_exit_code = 1
