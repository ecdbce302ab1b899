-- wrk: POST {"event":"e2e","data":{"uuid":...,"sent_at":...}} at a fixed rate, for the end-to-end
-- row of bench/run.py. sent_at is the wall clock (seconds) when wrk writes the request: wrk calls
-- request() just before it sends. Each thread hands out send times RATE/threads per second apart;
-- delay() makes a connection wait for the next free one, so the rate holds whatever the latency
-- (open loop, as long as there are connections free: run it with plenty).
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_usec; } timeval;
int gettimeofday(timeval *tv, void *tz);
]]
local tv = ffi.new("timeval")
local function now()
   ffi.C.gettimeofday(tv, nil)
   return tonumber(tv.tv_sec) + tonumber(tv.tv_usec) / 1e6
end

local threads = 0
function setup(thread)
   threads = threads + 1
   thread:set("tid", threads)
end

local interval, due, counter = nil, nil, 0
function init(args)
   interval = tonumber(os.getenv("HIPCALL_BENCH_THREADS")) / tonumber(os.getenv("HIPCALL_BENCH_RATE"))
   due = now() + interval * (tid or 1) / tonumber(os.getenv("HIPCALL_BENCH_THREADS"))
end

function delay()
   local wait = due - now()
   due = due + interval
   if wait < 0 then return 0 end
   return wait * 1000
end

function request()
   counter = counter + 1
   local body = string.format('{"event":"e2e","data":{"uuid":"%d-%d","sent_at":%.6f}}', tid or 0, counter, now())
   return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
