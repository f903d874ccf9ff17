-- wrk script: POST the small chat body of post.lua, each request to a path never sent before
-- (WRK_PREFIX .. "/" .. counter, default prefix /v1/uniq/<start time>), so no route-match cache can
-- answer: every request walks the whole route table and falls to the default route.
-- done() prints one JSON line prefixed "WRKJSON " (same fields as post.lua).
local prefix = os.getenv("WRK_PREFIX") or ("/v1/uniq/" .. os.time())
local body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":32}'
local headers = {["Content-Type"] = "application/json",
                 ["Authorization"] = "Bearer sk-bench-0000000000000000000000000000"}
local n = 0
local tid = 0
local threads_seen = 0

function setup(thread)
  threads_seen = threads_seen + 1
  thread:set("tid", threads_seen)
end

function request()
  n = n + 1
  return wrk.format("POST", prefix .. "/t" .. tid .. "-" .. n, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"rps":%.2f,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d,"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
