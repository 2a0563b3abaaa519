-- wrk script: every request carries a key drawn from a numbered set, so calls spread over many
-- consumers. KEY_PREFIX, KEY_COUNT and KEY_STEP come from the environment (set by benches/run.sh).
local prefix = os.getenv("KEY_PREFIX") or "bench-key-"
local count = tonumber(os.getenv("KEY_COUNT") or "100000")
local step = tonumber(os.getenv("KEY_STEP") or "1")
local uri = os.getenv("ORIGINAL_URI") or "/midm-base/chat"

request = function()
  local n = math.random(0, math.floor((count - 1) / step)) * step
  return wrk.format("GET", nil, { ["apikey"] = prefix .. n, ["X-Forwarded-Uri"] = uri })
end
