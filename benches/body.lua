-- wrk script: POST /auth-body with a fixed JSON body (the file BODY_FILE), the key (KEY) and the
-- original URI (URI) as Traefik's forwardAuth would send them. wrk sets Content-Length from wrk.body.
-- With UNIQUE=1 the last message's text starts with a new number on every request, so its count
-- is never a cache hit (the text differs; its words still repeat, as in real prose).
local file = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["apikey"] = os.getenv("KEY")
wrk.headers["X-Forwarded-Uri"] = os.getenv("URI")
wrk.headers["Content-Type"] = "application/json"

if os.getenv("UNIQUE") == "1" then
    local head, tail = wrk.body:match('^(.*"content":")(.*)$')
    local n = 0
    request = function()
        n = n + 1
        return wrk.format(nil, nil, nil, head .. n .. " " .. tail)
    end
end
