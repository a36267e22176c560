-- All-new path: every request carries a fresh Idempotency-Key.
-- Usage: wrk ... -s new.lua URL -- <key prefix unique to this run/variant/phase>
package.path = debug.getinfo(1, "S").source:match("^@(.*/)") .. "?.lua;" .. package.path
local common = require("common")
common.setup_request()

setup = common.harness.setup

function init(args)
  common.harness.fresh_keys(args[1])
end

request = common.harness.request
done = common.harness.done
