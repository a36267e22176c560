-- Replay path: every request carries the same Idempotency-Key and body, so after the first
-- (made during the warm-up) every request is a replay of a completed record.
-- Usage: wrk ... -s replay.lua URL -- <the fixed key>
package.path = debug.getinfo(1, "S").source:match("^@(.*/)") .. "?.lua;" .. package.path
local common = require("common")
common.setup_request()

function init(args)
  wrk.headers["Idempotency-Key"] = args[1] or "replay-key"
end

-- No request() function: wrk builds the request once (after init) and reuses it.
done = common.harness.done
