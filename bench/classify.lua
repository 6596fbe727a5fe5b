-- wrk script: classify (the seeds' body) with a bearer token from TOKENS_FILE (env), one
-- token per line, rotated round robin per request. One line: the one-token case; 512
-- distinct tokens: the many-token case (more than the front's 256-slot verified-token
-- table, so most requests pay for a full signature check, as with many users). Each thread
-- starts at another offset. The requests are formatted once, in init(): request() only
-- picks one, so the script costs the same whatever the token count.
local reqs = {}
local n = 0
local i = 0

function init(args)
  local path = os.getenv("TOKENS_FILE")
  local f = assert(io.open(path, "r"), "TOKENS_FILE unreadable: " .. tostring(path))
  local body = os.getenv("BODY")
  for line in f:lines() do
    if #line > 0 then
      local headers = {
        ["Authorization"] = "Bearer " .. line,
        ["Content-Type"] = "application/json",
      }
      n = n + 1
      reqs[n] = wrk.format("POST", "/v1/classify", headers, body)
    end
  end
  f:close()
  assert(n > 0, "no token in " .. path)
  -- thread_index comes from setup(): thread k starts k half-rounds in.
  i = ((thread_index or 0) * math.floor(n / 2)) % n
end

local threads_seen = 0

-- Runs in the main Lua state before each thread's init().
function setup(thread)
  thread:set("thread_index", threads_seen)
  threads_seen = threads_seen + 1
end

function request()
  i = i % n + 1
  return reqs[i]
end

function done(summary, latency, requests)
  io.write(string.format(
    "RESULT requests=%d seconds=%.3f p50_us=%d p99_us=%d connect=%d read=%d write=%d timeout=%d non2xx=%d\n",
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(99),
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout,
    summary.errors.status))
end
