-- wrk script for scripts/bench.py: POST one fixed body, stop after a request cap,
-- and print one machine-readable result line (bench.py parses "BENCHJSON {...}").
--   BENCH_BODY_FILE  file holding the request body (required)
--   BENCH_HEADERS    extra request headers, "Name: value" lines
--   BENCH_MAX_REQ    cap on completed requests per wrk thread: the count bound
--                    next to wrk's -d time bound
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local path = assert(os.getenv("BENCH_BODY_FILE"), "BENCH_BODY_FILE is not set")
local file = assert(io.open(path, "rb"))
wrk.body = file:read("*a")
file:close()

for line in string.gmatch(os.getenv("BENCH_HEADERS") or "", "[^\n]+") do
  local name, value = string.match(line, "^%s*([^:]+):%s*(.-)%s*$")
  if name then wrk.headers[name] = value end
end

local max_requests = tonumber(os.getenv("BENCH_MAX_REQ") or "") or 1000000
local seen = 0

-- Defining response() costs wrk a little per request; it is the only way to cap the count.
function response(status, headers, body)
  seen = seen + 1
  if seen >= max_requests then wrk.thread:stop() end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
