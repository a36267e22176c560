-- POST /v1/payments, automatic capture, a fresh Idempotency-Key per request.
-- Usage: wrk ... -s payment.lua URL -- <api key> <key prefix unique to this run>
local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

local prefix, counter = "k", 0

function init(args)
  wrk.method = "POST"
  wrk.path = "/v1/payments"
  wrk.body = '{"amount":1250,"currency":"EUR","payment_method":"pm_card_ok"}'
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. args[1]
  prefix = (args[2] or "k") .. "-t" .. tostring(tid or 0) .. "-"
end

function request()
  counter = counter + 1
  wrk.headers["Idempotency-Key"] = prefix .. counter
  return wrk.format()
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'E2E_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
