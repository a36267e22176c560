-- Shared by new.lua and replay.lua: the request; the harness (bench/harness/wrkscript.lua) has
-- the keys and the JSON summary line run.py parses.
local here = debug.getinfo(1, "S").source:match("^@(.*/)")
package.path = here .. "../harness/?.lua;" .. package.path
local M = {}

M.harness = require("wrkscript")
M.body = '{"amount":1250,"currency":"eur","customer":"cus_0042","description":"overhead bench"}'

function M.setup_request()
  wrk.method = "POST"
  wrk.path = "/charges"
  wrk.body = M.body
  wrk.headers["Content-Type"] = "application/json"
end

return M
