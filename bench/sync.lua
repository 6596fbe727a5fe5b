-- wrk script: sync merges with a fresh Idempotency-Key per request (the seeds' payload).
-- SESSIONS=1 (env) puts every merge on one hot session; the default spreads them over 500.
-- THINK_MS (env) makes each connection a Locust-style user: it waits a random 0.5-1.5 x
-- THINK_MS between its requests (wrk's latency figures leave the wait out). Without it, the
-- connections send back to back (closed loop: the merge capacity).
local counter = 0
local sessions = tonumber(os.getenv("SESSIONS") or "500")
local token = os.getenv("TOKEN")
local think_ms = tonumber(os.getenv("THINK_MS") or "0")
-- Keys must differ between runs against one database: the same key with another body is a
-- 422 by design (and wrk's math.random repeats its sequence in every run).
local run_id = os.getenv("RUN_ID") or tostring(os.time())
local thread_id = 0

local threads = {}

function setup(thread)
  thread:set("tid", thread_id)
  thread_id = thread_id + 1
  table.insert(threads, thread)
end

-- Answers by status, per thread (summed in done()), so a failure says what it was.
statuses = {}

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function request()
  counter = counter + 1
  local session = "bench-" .. (counter % sessions)
  local body = '{"changes":[{"op":"set","path":"/extinguishers/FE-' .. (counter % 50) ..
      '/pressure","value":"low"}],"_sync_meta":{"vector_clock":{}}}'
  local headers = {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = "k-" .. run_id .. "-" .. tid .. "-" .. counter,
  }
  return wrk.format("POST", "/v1/tests/sessions/" .. session .. "/results", headers, body)
end

function delay()
  if think_ms <= 0 then
    return 0
  end
  return math.floor(think_ms * (0.5 + math.random()))
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      total[status] = (total[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(total) do
    table.insert(parts, status .. ":" .. n)
  end
  table.sort(parts)
  io.write("STATUSES " .. table.concat(parts, ",") .. "\n")
  io.write(string.format("RESULT requests=%d errors=%d p50_us=%d p95_us=%d p99_us=%d seconds=%.2f non2xx=%d\n",
    summary.requests, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), summary.duration / 1e6,
    summary.errors.status))
end
