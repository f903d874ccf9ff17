-- wrk script: GET a path (env WRK_PATH, default /v1/files/size-1k/content) with an Authorization
-- header, as bench/suite.py's response-size pass does. done() prints one JSON line prefixed
-- "WRKJSON " (same fields as post.lua).
wrk.method = "GET"
wrk.path = os.getenv("WRK_PATH") or "/v1/files/size-1k/content"
wrk.headers["Authorization"] = "Bearer sk-bench-0000000000000000000000000000"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"rps":%.2f,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d,"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
