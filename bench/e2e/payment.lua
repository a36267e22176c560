-- POST /v1/payments, automatic capture, a fresh Idempotency-Key per request.
-- Usage: wrk ... -s payment.lua URL -- <api key> <key prefix unique to this run>
package.path = debug.getinfo(1, "S").source:match("^@(.*/)") .. "../harness/?.lua;" .. package.path
local harness = require("wrkscript")

setup = harness.setup

function init(args)
  wrk.method = "POST"
  wrk.path = "/v1/payments"
  wrk.body = '{"amount":1250,"currency":"EUR","payment_method":"pm_card_ok"}'
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. args[1]
  harness.fresh_keys(args[2])
end

request = harness.request
done = harness.done
