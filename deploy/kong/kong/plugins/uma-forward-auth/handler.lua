-- uma-forward-auth: asks user-metadata-auth (GET <auth_url>) whether a call may go upstream, and
-- copies the consumer's metadata headers onto it. Replaces the key-auth + acl + user-metadata
-- plugins on a route: the service checks the key, the ACL groups and the entitlement itself.
--
-- Access phase:
--   1. client copies of the twelve metadata headers are removed from the upstream request;
--   2. the service is called with X-Original-URI (path and query as the client sent them),
--      X-Original-Method, X-Original-Host and the client's apikey / x-api-key / authorization
--      headers plus any conf.key_names (every copy, so that the service can refuse a repeated key);
--      run the service with auth.original_request = "original" (and auth.entry_selectors =
--      ["query"] when conf.metadata_id is used);
--   3. 200: the twelve headers are set on the upstream request, and with hide_credentials the
--      client's apikey / x-api-key headers and apikey query parameter are removed;
--      400/401/403/429/503: the service's status, body and headers go back to the client;
--      anything else, or no answer within conf.timeout: 503.
--
-- Header filter phase: the RateLimit-Policy and RateLimit fields of an allowed answer (entries
-- with limits, SPEC section 8.1) are set on the client's response, never on the upstream request.
-- They are kept in kong.ctx.plugin until then, so that they land on whatever response the client
-- gets (the upstream's, or one a later plugin such as ai-proxy produces) and replace any copy of
-- the upstream's.

local http = require("resty.http")

local kong = kong
local ngx = ngx
local ipairs = ipairs
local type = type

-- The headers of an allowed answer (SPEC section 4), as the service names them.
local METADATA_HEADERS = {
  "X-User-TDL-Matrix",
  "X-User-Capabilities",
  "X-Consumer-ID",
  "X-User-Max-Input-Tokens",
  "X-User-Max-Output-Tokens",
  "X-User-Input-Cost",
  "X-User-Output-Cost",
  "X-User-Provider",
  "X-User-Tags",
  "X-Consumer-Username",
  "X-Consumer-Custom-ID",
  "X-Consumer-Groups",
}

-- Client headers that may carry the API key, in the service's order of precedence.
local KEY_HEADERS = { "apikey", "x-api-key", "authorization" }

-- Removed from the upstream request when conf.hide_credentials is set (as key-auth does).
local HIDDEN_HEADERS = { "apikey", "x-api-key" }

-- Deny answers passed on to the client, and the headers of theirs that go with them.
local DENY_STATUSES = { [400] = true, [401] = true, [403] = true, [429] = true, [503] = true }
local DENY_HEADERS = {
  "Content-Type",
  "Cache-Control",
  "WWW-Authenticate",
  "Retry-After",
  "RateLimit-Policy",
  "RateLimit",
}

-- Answers for the client on an allowed call (a 429 passes them on with DENY_HEADERS).
local CLIENT_HEADERS = { "RateLimit-Policy", "RateLimit" }

local UNAVAILABLE_BODY = '{"message":"Authorization service unavailable"}'

local UmaForwardAuth = {
  -- After key-auth (1250) would have run, before acl (950), rate limiting and ai-proxy (770).
  PRIORITY = 1100,
  VERSION = "0.1.0",
}

-- A header value from resty.http: a string, or a table when the header was repeated.
local function first(value)
  if type(value) == "table" then
    return value[1]
  end
  return value
end

local function unavailable()
  return kong.response.exit(503, UNAVAILABLE_BODY, {
    ["Content-Type"] = "application/json",
    ["Cache-Control"] = "no-store",
    ["Retry-After"] = "1",
  })
end

local function auth_url(conf)
  if conf.metadata_id == nil or conf.metadata_id == "" then
    return conf.auth_url
  end
  -- The operator's pin for this route (SPEC section 4, rule 2); the client cannot reach it.
  local separator = "?"
  if conf.auth_url:find("?", 1, true) then
    separator = "&"
  end
  return conf.auth_url .. separator .. "metadata_id=" .. ngx.escape_uri(conf.metadata_id)
end

local function hide_credentials()
  for _, name in ipairs(HIDDEN_HEADERS) do
    kong.service.request.clear_header(name)
  end
  local query = kong.request.get_query()
  if query.apikey ~= nil then
    query.apikey = nil
    kong.service.request.set_query(query)
  end
end

function UmaForwardAuth:access(conf)
  -- Whatever happens next, no client-made copy of a metadata header reaches the upstream.
  for _, name in ipairs(METADATA_HEADERS) do
    kong.service.request.clear_header(name)
  end

  local headers = {
    ["X-Original-URI"] = ngx.var.request_uri,
    ["X-Original-Method"] = kong.request.get_method(),
    ["X-Original-Host"] = kong.request.get_host(),
  }
  local client_headers = kong.request.get_headers()
  local function forward(name)
    local value = client_headers[name]
    if value ~= nil then
      headers[name] = value
    end
  end
  for _, name in ipairs(KEY_HEADERS) do
    forward(name)
  end
  -- The key names of the seed's key-auth plugin on this route, when it renames `apikey`.
  for _, name in ipairs(conf.key_names or {}) do
    forward(name)
  end

  local url = auth_url(conf)
  local httpc = http.new()
  httpc:set_timeout(conf.timeout)
  local res, err = httpc:request_uri(url, {
    method = "GET",
    headers = headers,
    keepalive_timeout = conf.keepalive_timeout,
    keepalive_pool = conf.keepalive_pool,
  })
  if not res then
    kong.log.err("user-metadata-auth did not answer at ", url, ": ", err)
    return unavailable()
  end

  local status = res.status
  if status == 200 then
    for _, name in ipairs(METADATA_HEADERS) do
      -- The service sends all twelve, empty rather than omitted.
      kong.service.request.set_header(name, first(res.headers[name]) or "")
    end
    if conf.hide_credentials then
      hide_credentials()
    end
    local for_client
    for _, name in ipairs(CLIENT_HEADERS) do
      local value = first(res.headers[name])
      if value ~= nil and value ~= "" then
        for_client = for_client or {}
        for_client[name] = value
      end
    end
    kong.ctx.plugin.client_headers = for_client
    return
  end

  if DENY_STATUSES[status] then
    local deny_headers = {}
    for _, name in ipairs(DENY_HEADERS) do
      local value = res.headers[name]
      if value ~= nil then
        deny_headers[name] = value
      end
    end
    return kong.response.exit(status, res.body or "", deny_headers)
  end

  kong.log.err("user-metadata-auth answered an unexpected status ", status, " at ", url)
  return unavailable()
end

function UmaForwardAuth:header_filter(_)
  local client_headers = kong.ctx.plugin.client_headers
  if client_headers == nil then
    return
  end
  for _, name in ipairs(CLIENT_HEADERS) do
    local value = client_headers[name]
    if value ~= nil then
      kong.response.set_header(name, value)
    end
  end
end

return UmaForwardAuth
