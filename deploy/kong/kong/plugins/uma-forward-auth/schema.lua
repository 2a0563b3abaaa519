-- Configuration of the uma-forward-auth plugin (Kong 3.x schema).
local typedefs = require("kong.db.schema.typedefs")

return {
  name = "uma-forward-auth",
  fields = {
    -- The service identifies the consumer from the key: the plugin is set on routes or services.
    { consumer = typedefs.no_consumer },
    { protocols = typedefs.protocols_http },
    {
      config = {
        type = "record",
        fields = {
          -- The service's /auth endpoint.
          { auth_url = typedefs.url({ required = true, default = "http://127.0.0.1:8089/auth" }) },
          -- Connect, send and read timeout towards the service, in milliseconds.
          { timeout = { type = "integer", required = true, default = 500, between = { 1, 60000 } } },
          -- Idle keep-alive connections to the service: how long (ms) and how many per worker. Keep
          -- it below the service's idle timeout (server.idle_timeout_ms, and hyper's header-read
          -- timeout between requests), so a call never races the service closing its connection.
          { keepalive_timeout = { type = "integer", required = true, default = 5000, gt = 0 } },
          { keepalive_pool = { type = "integer", required = true, default = 64, gt = 0 } },
          -- Remove the client's apikey / x-api-key headers and apikey query parameter upstream.
          { hide_credentials = { type = "boolean", required = true, default = true } },
          -- Optional pin: the metadata entry every call on this route gets (sent as
          -- ?metadata_id= on the auth URL; a config-route pin on the service side still wins).
          { metadata_id = { type = "string", required = false } },
          -- Headers that carry the key besides apikey / x-api-key / authorization: the key_names
          -- of the key-auth plugin the seed has on this route.
          { key_names = { type = "array", elements = { type = "string" }, required = false } },
        },
      },
    },
  },
}
