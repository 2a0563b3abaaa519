-- wrk script: POST /usage with batches of BATCH native records (default 100) for CONSUMER and
-- ENTRY (default: the hot path's user1-client and kt-midm-base), the bearer USAGE_TOKEN, and no
-- `time` (the service takes the arrival). Every request id is new: RUN_ID (one per wrk run, set by
-- benches/run.sh), the thread's number, the thread's request counter and the record's index, so no
-- record is ever a duplicate. An answer that is not 200 with "accepted":BATCH is counted, and the
-- total printed at the end as "usage answers without accepted BATCH: N".
local batch = tonumber(os.getenv("BATCH") or "100")
local consumer = os.getenv("CONSUMER") or "user1-client"
local entry = os.getenv("ENTRY") or "kt-midm-base"
local run = os.getenv("RUN_ID") or tostring(os.time())
local headers = {
  ["Authorization"] = "Bearer " .. (os.getenv("USAGE_TOKEN") or ""),
  ["Content-Type"] = "application/json",
}
local head = '{"request_id":"'
local tail = '","consumer":"' .. consumer .. '","metadata_id":"' .. entry .. '","input_tokens":14,"output_tokens":21}'

local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  counter = 0
  bad = 0
  prefix = run .. "-" .. id .. "-"
end

function request()
  counter = counter + 1
  local records = {}
  local base = prefix .. counter .. "-"
  for i = 1, batch do
    records[i] = head .. base .. i .. tail
  end
  return wrk.format("POST", "/usage", headers, "[" .. table.concat(records, ",") .. "]")
end

function response(status, _, body)
  local accepted = status == 200 and body and body:match('"accepted"%s*:%s*(%d+)')
  if tonumber(accepted) ~= batch then
    bad = bad + 1
  end
end

function done(_, _, _)
  local total = 0
  for _, thread in ipairs(threads) do
    total = total + thread:get("bad")
  end
  io.write(string.format("usage answers without accepted %d: %d\n", batch, total))
end
