-- Shared by new.lua and replay.lua: the request and the JSON summary line run.py parses.
local M = {}

M.body = '{"amount":1250,"currency":"eur","customer":"cus_0042","description":"overhead bench"}'

function M.setup_request()
  wrk.method = "POST"
  wrk.path = "/charges"
  wrk.body = M.body
  wrk.headers["Content-Type"] = "application/json"
end

function M.done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'OVERHEAD_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"mean_us":%.1f,"max_us":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end

return M
