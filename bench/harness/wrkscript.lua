-- What every benchmark's wrk script shares: numbered threads, a fresh Idempotency-Key per
-- request, and the one JSON summary line bench/harness/load.py parses.
-- A script loads it with
--   package.path = debug.getinfo(1, "S").source:match("^@(.*/)") .. "../harness/?.lua;" .. package.path
--   local harness = require("wrkscript")
local M = {}

local threads = {}
local prefix, counter = "k", 0

-- setup = harness.setup: number the threads, so that their keys never meet.
function M.setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

-- From init(args): keys "<run prefix>-t<thread>-<n>".
function M.fresh_keys(run_prefix)
  prefix = (run_prefix or "k") .. "-t" .. tostring(tid or 0) .. "-"
end

-- request = harness.request: the same request, each time under a new key.
function M.request()
  counter = counter + 1
  wrk.headers["Idempotency-Key"] = prefix .. counter
  return wrk.format()
end

-- done = harness.done
function M.done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"mean_us":%.1f,"max_us":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end

return M
