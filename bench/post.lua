-- wrk: POST the seed call_hangup webhook (tests/fixtures/call_hangup.json), each request with a call
-- uuid of its own, as Hipcall's traffic has (one call_hangup per call). The same body on every request
-- would give every request one message id, and publishes with one id are confirmed one at a time by
-- design (ingest/publish.py): a different benchmark (see bench/README.md).
local f = assert(io.open(os.getenv("HIPCALL_BENCH_BODY"), "rb"))
local template = f:read("*a")
f:close()
local threads = 0
local counter = 0

function setup(thread)
   threads = threads + 1
   thread:set("tid", threads)
end

function request()
   counter = counter + 1
   local uuid = string.format("%08x-0000-4000-8000-%012x", tid or 0, counter)
   local body = string.gsub(template, "2483a75a%-56a2%-41f1%-991b%-92b1667e324a", uuid)
   return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
