-- All-new path: every request carries a fresh Idempotency-Key.
-- Usage: wrk ... -s new.lua URL -- <key prefix unique to this run/variant/phase>
package.path = debug.getinfo(1, "S").source:match("^@(.*/)") .. "?.lua;" .. package.path
local common = require("common")
common.setup_request()

local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

local prefix = "k"
local counter = 0

function init(args)
  prefix = (args[1] or "k") .. "-t" .. tostring(tid or 0) .. "-"
end

function request()
  counter = counter + 1
  wrk.headers["Idempotency-Key"] = prefix .. counter
  return wrk.format()
end

done = common.done
