-- kgate for nginx / OpenResty: limit the inference-time compute of each caller of model APIs.
--
-- A lua-nginx-module plugin with one function per phase, as Kong and APISIX plugins are built:
--
--   access()         POST /v1/admit to kgate's decision API; allow → send kgate's body, headers and path to the
--                    upstream kgate named; deny → answer kgate's error (already in the client's API shape)
--   header_filter()  add kgate's response headers; drop Content-Length when the body will change
--   body_filter()    keep the upstream's raw bytes for metering (settled in segments, in order, by one timer per
--                    request); drop the usage event kgate added to a stream; put the public model name back
--   log()            the final settle: the upstream's status and how the exchange ended
--
-- kgate's decision API is described in docs/decision-api.yaml and docs/design.md §13; this file needs
-- lua-nginx-module (0.10.x), lua-resty-core and lua-cjson. See deploy/nginx/README.md.

local cjson = require "cjson.safe"

local ngx = ngx
local ngx_var = ngx.var
local ngx_req = ngx.req
local ngx_log = ngx.log
local ERR, WARN, INFO = ngx.ERR, ngx.WARN, ngx.INFO
local encode_base64 = ngx.encode_base64
local timer_at = ngx.timer.at
local tcp = ngx.socket.tcp

local byte, find, sub, lower, format, match, gsub =
    string.byte, string.find, string.sub, string.lower, string.format, string.match, string.gsub
local concat, remove = table.concat, table.remove
local pairs, ipairs, type, tostring, tonumber, pcall, next =
    pairs, ipairs, type, tostring, tonumber, pcall, next

local _M = { _VERSION = "1.0.0" }

-- Client headers that carry a caller's credentials (kgate's CREDENTIAL_HEADERS): never sent upstream.
local CREDENTIAL_HEADERS = { "authorization", "x-api-key", "x-goog-api-key", "api-key", "proxy-authorization",
                             "cookie" }
-- Headers nginx itself manages on the upstream request: never cleared by client_headers = "replace".
local KEEP_HEADERS = { host = true }

local defaults = {
    decision = "unix:/run/kgate/decision.sock", -- kgate's decision API: "unix:/path" or "HOST:PORT"
    token = nil,                   -- bearer token for the decision API (default: $KGATE_DECISION_TOKEN)
    token_env = "KGATE_DECISION_TOKEN",
    timeout_ms = 2000,             -- admit: connect, send and read timeouts each
    settle_timeout_ms = 5000,      -- settle: the same, per attempt
    settle_attempts = 3,           -- a settle is idempotent: retried on a failure
    unknown_callers = "deny",      -- kgate unreachable, caller never seen: "deny" (503) or "allow" (unmetered)
    fail_open_ttl = 600,           -- seconds a caller's fail_open (and a model's route) is remembered
    shared_dict = "kgate",         -- lua_shared_dict for that memory
    segment_bytes = 65536,         -- settle the answer in segments of this size while it streams
    client_headers = "replace",    -- "replace": the upstream gets exactly kgate's upstream_headers;
                                   -- "keep": the client's headers minus credentials, plus kgate's
    read_timeout_ms = 60000,       -- your proxy_read_timeout: an answer cut after a silence this long is a stall
    keepalive_ms = 30000,          -- idle connections to kgate kept this long (under aiohttp's 75 s)
    pool_size = 64,                -- idle connections to kgate per worker
}

local opts = {}
for k, v in pairs(defaults) do opts[k] = v end
local decision_addr            -- { unix = "unix:/path" } or { host = ..., port = ... }
local auth_line = ""           -- "Authorization: Bearer ...\r\n" or ""
local secret = ""              -- keys the credential digests in the shared dict (random per nginx start)

local function parse_address(s)
    s = gsub(s, "^https?://", "")
    if sub(s, 1, 5) == "unix:" then
        return { unix = s, name = s }
    end
    local host, port = match(s, "^%[([^%]]+)%]:(%d+)/?$")
    if not host then
        host, port = match(s, "^([^:/]+):(%d+)/?$")
    end
    if not host then
        return nil, "decision must be unix:/path or HOST:PORT, not " .. tostring(s)
    end
    return { host = host, port = tonumber(port), name = s }
end

local function random_secret()
    local f = io.open("/dev/urandom", "rb")
    if f then
        local r = f:read(32)
        f:close()
        if r and #r == 32 then
            return r
        end
    end
    return tostring(ngx.now()) .. tostring({}) .. tostring(math.random())
end

-- configure{...}: call once, from init_by_lua* (in nginx's master: every worker then shares the random key of the
-- shared memory's entries; from init_worker_by_lua* each worker would remember only what it saw itself).
-- Unknown options are an error.
function _M.configure(options)
    options = options or {}
    for k, v in pairs(options) do
        if defaults[k] == nil and k ~= "token" then
            error("kgate: unknown option " .. tostring(k), 2)
        end
        opts[k] = v
    end
    local addr, err = parse_address(opts.decision)
    if not addr then
        error("kgate: " .. err, 2)
    end
    if opts.unknown_callers ~= "deny" and opts.unknown_callers ~= "allow" then
        error("kgate: unknown_callers must be \"deny\" or \"allow\"", 2)
    end
    if opts.client_headers ~= "replace" and opts.client_headers ~= "keep" then
        error("kgate: client_headers must be \"replace\" or \"keep\"", 2)
    end
    decision_addr = addr
    local token = opts.token or (opts.token_env and os.getenv(opts.token_env))
    if token and find(token, "[^\33-\126]") then
        error("kgate: the decision API token must be printable ASCII without spaces", 2)
    end
    auth_line = (token and token ~= "") and ("Authorization: Bearer " .. token .. "\r\n") or ""
    if secret == "" then
        secret = random_secret()
    end
    return opts
end

-- configure_once(conf): configure unless `conf` (the same table) already is in force — for plugin systems that
-- hand each phase its configuration (Kong, APISIX) instead of running init_by_lua.
local configured_with
function _M.configure_once(options)
    if options ~= configured_with then
        _M.configure(options)
        configured_with = options
    end
end

-- ------------------------------------------------------------------------------------------------------------
-- A small HTTP/1.1 client over a cosocket, with keep-alive pooling (lua-resty-http is not packaged by Debian).

local function read_body(sock, length, chunked)
    if chunked then
        local parts = {}
        while true do
            local line, err = sock:receive("*l")
            if not line then return nil, err end
            local size = tonumber(match(line, "^%s*(%x+)"), 16)
            if not size then return nil, "bad chunk size" end
            if size == 0 then
                repeat  -- trailers, then the blank line
                    line, err = sock:receive("*l")
                    if not line then return nil, err end
                until line == ""
                return concat(parts)
            end
            local data
            data, err = sock:receive(size)
            if not data then return nil, err end
            parts[#parts + 1] = data
            local crlf
            crlf, err = sock:receive(2)
            if not crlf then return nil, err end
        end
    end
    if length then
        if length == 0 then return "" end
        return sock:receive(length)
    end
    return sock:receive("*a")
end

-- One exchange on one connection. Returns status, body; or nil, err, retryable (a reused idle connection that
-- kgate had closed before reading anything: the request never reached it).
local function exchange(path, payload, timeout_ms)
    local sock = tcp()
    sock:settimeouts(timeout_ms, timeout_ms, timeout_ms)
    local ok, err
    if decision_addr.unix then
        ok, err = sock:connect(decision_addr.unix)
    else
        ok, err = sock:connect(decision_addr.host, decision_addr.port)
    end
    if not ok then
        return nil, "connect to " .. decision_addr.name .. ": " .. tostring(err), false
    end
    local reused = (sock:getreusedtimes() or 0) > 0
    local request = { "POST ", path, " HTTP/1.1\r\nHost: kgate\r\nContent-Type: application/json\r\n",
                      "Content-Length: ", #payload, "\r\n", auth_line, "\r\n", payload }
    local sent
    sent, err = sock:send(request)
    if not sent then
        sock:close()
        return nil, "send: " .. tostring(err), reused
    end
    local line, partial
    line, err, partial = sock:receive("*l")
    if not line then
        sock:close()
        return nil, "receive: " .. tostring(err), reused and err == "closed" and (partial or "") == ""
    end
    local status = tonumber(match(line, "^HTTP/1%.%d (%d%d%d)"))
    if not status then
        sock:close()
        return nil, "not an HTTP answer: " .. sub(line, 1, 64), false
    end
    local length, chunked, close = nil, false, match(line, "^HTTP/1%.0") ~= nil
    while true do
        line, err = sock:receive("*l")
        if not line then
            sock:close()
            return nil, "receive: " .. tostring(err), false
        end
        if line == "" then break end
        local name, value = match(line, "^([^:]+):%s*(.-)%s*$")
        if name then
            name = lower(name)
            if name == "content-length" then
                length = tonumber(value)
            elseif name == "transfer-encoding" then
                chunked = find(lower(value), "chunked", 1, true) ~= nil
            elseif name == "connection" then
                local v = lower(value)
                close = v == "close" or (close and v ~= "keep-alive")
            end
        end
    end
    local body
    body, err = read_body(sock, length, chunked)
    if not body then
        sock:close()
        return nil, "receive: " .. tostring(err), false
    end
    if close or (not length and not chunked) then
        sock:close()
    else
        sock:setkeepalive(opts.keepalive_ms, opts.pool_size)
    end
    return status, body
end

local function call(path, doc, timeout_ms)
    local payload = cjson.encode(doc)
    local status, body, retryable = exchange(path, payload, timeout_ms)
    if not status and retryable then  -- the pooled connection had gone stale: once more, on a new one
        status, body = exchange(path, payload, timeout_ms)
    end
    return status, body
end

-- ------------------------------------------------------------------------------------------------------------
-- Helpers

local function shape_for_path(path)
    if sub(path, 1, 12) == "/v1/messages" then return "anthropic" end
    if sub(path, 1, 7) == "/v1beta" then return "gemini" end
    return "openai"
end

local GEMINI_STATUS = { [400] = "INVALID_ARGUMENT", [401] = "UNAUTHENTICATED", [403] = "PERMISSION_DENIED",
                        [404] = "NOT_FOUND", [429] = "RESOURCE_EXHAUSTED", [500] = "INTERNAL",
                        [502] = "UNAVAILABLE", [503] = "UNAVAILABLE", [504] = "DEADLINE_EXCEEDED" }
local ANTHROPIC_TYPE = { [502] = "api_error", [503] = "overloaded_error", [504] = "timeout_error" }

-- An error body in the client's API shape (as kgate's gateway/engine/errors.py renders them).
local function error_body(shape, status, code, message)
    if shape == "anthropic" then
        return cjson.encode({ type = "error", error = { type = ANTHROPIC_TYPE[status] or "api_error",
                                                        message = message } })
    elseif shape == "gemini" then
        return cjson.encode({ error = { code = status, message = message,
                                        status = GEMINI_STATUS[status] or "INTERNAL" } })
    end
    return cjson.encode({ error = { message = message, type = "server_error", param = cjson.null, code = code } })
end

local function reply(status, headers, body)
    ngx.status = status
    for name, value in pairs(headers) do
        ngx.header[name] = value
    end
    ngx.header["Content-Length"] = #body
    ngx.print(body)
    return ngx.exit(ngx.HTTP_OK)
end

local function last_value(v)
    -- $upstream_* variables list one value per upstream tried: "a, b : c". The last is the answer's.
    if v == nil then return nil end
    return match(v, "([^,:%s]+)%s*$")
end

-- A plain (not pattern) replacement of every occurrence of `old` by `new`.
local function replace(s, old, new)
    local at = find(s, old, 1, true)
    if not at then return s end
    local out, pos, n = {}, 1, #old
    while at do
        out[#out + 1] = sub(s, pos, at - 1)
        out[#out + 1] = new
        pos = at + n
        at = find(s, old, pos, true)
    end
    out[#out + 1] = sub(s, pos)
    return concat(out)
end

local function rename(pairs_, s)
    for i = 1, #pairs_ do
        local p = pairs_[i]
        if find(s, p[1], 1, true) then
            s = replace(s, p[1], p[2])
        end
    end
    return s
end

-- The caller's credential, as kgate identifies callers: Authorization, x-api-key, x-goog-api-key or ?key=.
local function credential(headers, args)
    local v = headers["authorization"] or headers["x-api-key"] or headers["x-goog-api-key"]
              or headers["api-key"]
    if type(v) == "table" then v = v[1] end
    if not v and args then
        v = match("&" .. args, "&key=([^&]*)")
    end
    if not v or v == "" then return nil end
    return "c:" .. encode_base64(ngx.hmac_sha1(secret, v))
end

local function shared()
    return ngx.shared[opts.shared_dict]
end

-- The JSON string `"name"` as a client writes it, when it needs no escaping (else nil).
local function json_string(name)
    if type(name) ~= "string" or find(name, '[%c"\\]') then return nil end
    return '"' .. name .. '"'
end

-- ------------------------------------------------------------------------------------------------------------
-- Settling: segments of the answer's raw bytes, sent in order by one timer per request.

local function settle_one(k, item)
    local doc = { request_id = k.rid, offset = item.offset, final = item.final or nil, status = item.status,
                  outcome = item.outcome }
    if item.data and #item.data > 0 then
        doc.data_base64 = encode_base64(item.data)
    end
    local err
    for attempt = 1, opts.settle_attempts do
        local status, body = call("/v1/settle", doc, opts.settle_timeout_ms)
        if status == 200 then
            if item.final then
                local result = cjson.decode(body)
                if type(result) == "table" then
                    ngx_log(INFO, "kgate: request ", k.rid, " settled: ", tostring(result.decision), " ",
                            tostring(result.reason))
                end
            end
            return true
        end
        if status == 404 or status == 400 then  -- unknown (expired, another kgate) or refused: retrying won't help
            ngx_log(ERR, "kgate: settle of request ", k.rid, " refused (", status, "): ", sub(body or "", 1, 300))
            return false
        end
        err = status and ("status " .. status .. ": " .. sub(body or "", 1, 200)) or body
        if attempt < opts.settle_attempts then
            ngx.sleep(0.05 * attempt)
        end
    end
    ngx_log(ERR, "kgate: settle of request ", k.rid, " at offset ", item.offset, " failed: ", tostring(err),
            item.final and " (kgate charges it by on_missing_usage when its settle time is up)" or "")
    return false
end

local function send_queue(premature, k)  -- luacheck: ignore premature (a worker shutting down still settles)
    while true do
        local item = remove(k.queue, 1)
        if not item then break end
        local ok, err = pcall(settle_one, k, item)
        if not ok then
            ngx_log(ERR, "kgate: settle of request ", k.rid, " failed: ", tostring(err))
        end
    end
    k.sending = false
end

local function enqueue(k, item)
    local q = k.queue
    q[#q + 1] = item
    if k.sending then return end  -- the request's one sender picks it up: segments stay in order
    k.sending = true
    local ok, err = timer_at(0, send_queue, k)
    if not ok then
        k.sending = false
        ngx_log(ERR, "kgate: cannot start the settle of request ", k.rid, ": ", err,
                " (raise lua_max_pending_timers / lua_max_running_timers)")
    end
end

local function flush_segment(k)
    if k.seglen == 0 then return end
    local data = concat(k.seg)
    k.seg, k.seglen = {}, 0
    enqueue(k, { offset = k.offset, data = data, status = k.status })
    k.offset = k.offset + #data
end

-- ------------------------------------------------------------------------------------------------------------
-- access

local function unavailable(k, headers, args, body, reason)
    ngx_log(ERR, "kgate: the decision API is unavailable (", reason, ")")
    local dict = shared()
    local cred = credential(headers, args)
    local known = cred and dict and dict:get(cred)
    local open
    if known == nil then
        open = opts.unknown_callers == "allow"
    else
        open = known == 1
    end
    if not open then
        return reply(503, { ["Content-Type"] = "application/json" },
                     error_body(k.shape, 503, "kgate_unavailable",
                                "the compute gateway is unavailable; try again later"))
    end
    -- Fail open: the caller's tier serves when kgate's store is away. Serve it unmetered, to the route kgate
    -- gave this model last, without the caller's credentials.
    local uri = ngx_var.request_uri
    local path, query = match(uri, "^([^?]*)%??(.*)$")
    local model = match(path, "^/v1beta/models/([^/:]+):")
    local doc
    if not model then
        doc = cjson.decode(body)
        model = type(doc) == "table" and type(doc.model) == "string" and doc.model or nil
    end
    local route = model and dict and cjson.decode(dict:get("r:" .. model) or "")
    if type(route) ~= "table" or type(route.upstream) ~= "string" then
        return reply(503, { ["Content-Type"] = "application/json" },
                     error_body(k.shape, 503, "kgate_unavailable",
                                "the compute gateway is unavailable and has no route for this model; "
                                .. "try again later"))
    end
    if route.upstream_model and route.upstream_model ~= model then
        local old, new = json_string(model), json_string(route.upstream_model)
        if old and new then
            body = replace(replace(body, '"model":' .. old, '"model":' .. new), '"model": ' .. old,
                           '"model": ' .. new)
            ngx_req.set_body_data(body)
        end
        path = replace(path, "/models/" .. model .. ":", "/models/" .. route.upstream_model .. ":")
    end
    local kept = {}
    for pair in string.gmatch(query, "[^&]+") do
        if not find(pair, "^key=") and pair ~= "key" then kept[#kept + 1] = pair end
    end
    for _, name in ipairs(CREDENTIAL_HEADERS) do
        ngx_req.clear_header(name)
    end
    ngx_req.clear_header("accept-encoding")
    for name, value in pairs(route.headers or {}) do
        ngx_req.set_header(name, value)
    end
    ngx_var.kgate_upstream = route.upstream
    ngx_var.kgate_uri = #kept > 0 and (path .. "?" .. concat(kept, "&")) or path
    k.mode = "unmetered"
    k.rename = route.rename or {}
    ngx_log(WARN, "kgate: serving ", ngx_var.request_method, " ", path, " UNMETERED (kgate unavailable, ",
            known == nil and "unknown caller, unknown_callers = allow" or "the caller's tier is fail-open", ")")
end

local function remember(decision, headers, args)
    local dict = shared()
    if not dict then return end
    if decision.request_id ~= "" then  -- "": refused before identification; fail_open says nothing
        local cred = credential(headers, args)
        if cred then
            dict:set(cred, decision.fail_open == true and 1 or 0, opts.fail_open_ttl)
        end
    end
    if decision.decision ~= "allow" or type(decision.model) ~= "string" then return end
    local upstream_model = decision.model
    local first = decision.rename[1]
    if type(first) == "table" and type(first[1]) == "string" then
        local quoted = match(first[1], '^"model":%s*(".*")$') or match(first[1], '^"modelVersion":%s*(".*")$')
        local name = quoted and cjson.decode(quoted)
        if type(name) == "string" then upstream_model = name end
    end
    local upstream_headers = {}
    for name, value in pairs(decision.upstream_headers) do
        if name ~= "x-request-id" and sub(name, 1, 6) ~= "x-sim-" then upstream_headers[name] = value end
    end
    local route = cjson.encode({ upstream = decision.upstream, upstream_model = upstream_model,
                                 rename = decision.rename, headers = upstream_headers })
    if route then
        dict:set("r:" .. decision.model, route, opts.fail_open_ttl)
    end
end

local function valid(d)
    if type(d) ~= "table" then return false end
    if d.decision == "deny" then
        return type(d.status) == "number" and type(d.body) == "string" and type(d.headers) == "table"
    end
    return d.decision == "allow" and type(d.request_id) == "string" and type(d.upstream) == "string"
        and type(d.path) == "string" and type(d.body) == "string" and type(d.upstream_headers) == "table"
        and type(d.remove_headers) == "table" and type(d.response_headers) == "table"
        and type(d.rename) == "table"
end

-- The client's headers as kgate's API takes them (JSON strings): printable ASCII only, as kgate forwards no
-- other; a header that is not (a client's stray bytes) is left out rather than break the call.
local function clean_headers(headers)
    local out = {}
    for name, value in pairs(headers) do
        if type(value) == "table" then
            local vs = {}
            for _, v in ipairs(value) do
                if not find(v, "[^\32-\126\t]") then vs[#vs + 1] = v end
            end
            if #vs > 0 then out[name] = vs end
        elseif not find(value, "[^\32-\126\t]") and not find(name, "[^\33-\126]") then
            out[name] = value
        end
    end
    return out
end

local function percent_encode_raw(s)
    return (gsub(s, "[^\33-\126]", function(c) return format("%%%02X", byte(c)) end))
end

local function read_client_body()
    ngx_req.read_body()
    local body = ngx_req.get_body_data()
    if body then return body end
    local file = ngx_req.get_body_file()  -- the body did not fit client_body_buffer_size
    if file then
        local f = io.open(file, "rb")
        if f then
            body = f:read("*a")
            f:close()
        end
    end
    return body or ""
end

function _M.access()
    if not decision_addr then
        _M.configure({})  -- per worker: better call configure() in init_by_lua*
    end
    local k = { mode = "none", shape = shape_for_path(ngx_var.uri or "/") }
    ngx.ctx.kgate = k
    local body = read_client_body()
    local headers = ngx_req.get_headers(200)
    local args = ngx_var.args
    local peer = ngx_var.remote_addr or "unknown"
    if sub(peer, 1, 5) == "unix:" then peer = "unix" end
    local status, answer = call("/v1/admit", {
        method = ngx_req.get_method(), path = percent_encode_raw(ngx_var.request_uri), peer = peer,
        headers = clean_headers(headers), body_base64 = encode_base64(body),
    }, opts.timeout_ms)
    if status and status >= 400 and status < 500 then
        -- kgate refused the call itself (a wrong token: 401; a call it cannot read: 400): a fault of this
        -- deployment, never a reason to serve unmetered
        ngx_log(ERR, "kgate: the decision API refused the admit call (", status, "): ", sub(answer or "", 1, 300))
        return reply(503, { ["Content-Type"] = "application/json" },
                     error_body(k.shape, 503, "kgate_unavailable",
                                "the compute gateway is unavailable; try again later"))
    end
    local d = status == 200 and cjson.decode(answer) or nil
    if not valid(d) then  -- unreachable, timed out, 5xx (shutting down), or not a decision: kgate is away
        local why = status and ("status " .. status .. ": " .. sub(answer or "", 1, 200)) or tostring(answer)
        if status == 200 then why = "an answer that is not a decision: " .. sub(answer or "", 1, 200) end
        return unavailable(k, headers, args, body, why)
    end

    if d.decision == "deny" then
        k.mode = "deny"
        pcall(remember, d, headers, args)
        return reply(d.status, d.headers, d.body)
    end

    -- allow: kgate's body, path, upstream and headers, instead of the client's. From here on the request
    -- is held by kgate: the log phase settles it, however it ends.
    k.mode = "metered"
    k.rid = d.request_id
    k.stream = d.stream == true
    k.strip = d.strip_usage == true
    k.rename = d.rename
    k.response_headers = d.response_headers
    k.offset, k.seg, k.seglen, k.queue, k.sending = 0, {}, 0, {}, false
    local ok, err = pcall(remember, d, headers, args)
    if not ok then
        ngx_log(ERR, "kgate: cannot remember the route of ", tostring(d.model), ": ", tostring(err))
    end
    if opts.client_headers == "replace" then
        for name in pairs(ngx_req.get_headers(200, true)) do
            if not KEEP_HEADERS[lower(name)] then
                ngx_req.clear_header(name)
            end
        end
    else
        for _, name in ipairs(d.remove_headers) do
            ngx_req.clear_header(name)
        end
        ngx_req.clear_header("accept-encoding")  -- the answer is metered: it must come uncompressed
    end
    ngx_req.set_body_data(d.body)
    for name, value in pairs(d.upstream_headers) do
        ngx_req.set_header(name, value)
    end
    ok = pcall(function()
        ngx_var.kgate_upstream = d.upstream
        ngx_var.kgate_uri = d.path
    end)
    if not ok then  -- the log phase still settles the request: not sent, nothing charged
        ngx_log(ERR, "kgate: declare `set $kgate_upstream \"\";` and `set $kgate_uri \"\";` in the location")
        return ngx.exit(500)
    end
    if type(d.upstream_url) == "string" then
        pcall(function() ngx_var.kgate_upstream_url = d.upstream_url end)  -- only where the config declares it
    end
end

-- ------------------------------------------------------------------------------------------------------------
-- header_filter

local function upstream_answered()
    -- The answer is the upstream's (not nginx's own error page) once its header arrived.
    local t = last_value(ngx_var.upstream_header_time)
    return t ~= nil and t ~= "-"
end

function _M.header_filter()
    local k = ngx.ctx.kgate
    if not k or (k.mode ~= "metered" and k.mode ~= "unmetered") then return end
    if k.mode == "unmetered" then
        ngx.header["x-kgate-unmetered"] = "1"
    else
        for name, value in pairs(k.response_headers) do
            ngx.header[name] = value
        end
    end
    if not upstream_answered() then
        -- nginx's own error (upstream unreachable, timed out before answering): answer it in the API's shape
        local status = ngx.status
        local code, message = "upstream_error", "the upstream could not be reached"
        if status == 504 then
            code, message = "upstream_timeout", "the upstream did not answer in time"
        elseif status < 502 or status > 504 then
            code, message = "gateway_error", "the gateway could not forward the request"
        end
        k.error_body = error_body(k.shape, status >= 400 and status or 502, code, message)
        ngx.header["Content-Type"] = "application/json"
        ngx.header["Content-Length"] = nil
        return
    end
    k.answered = true
    k.status = ngx.status
    k.sse = find(ngx.header["Content-Type"] or "", "event-stream", 1, true) ~= nil
    if k.mode == "unmetered" then
        k.stream = k.sse  -- kgate did not say: an event stream is filtered event by event, anything else whole
    end
    k.filter = (k.stream and k.strip) or #k.rename > 0
    k.pending, k.parts = "", {}
    if k.filter then
        ngx.header["Content-Length"] = nil
    end
end

-- ------------------------------------------------------------------------------------------------------------
-- body_filter

-- Whether an SSE event is OpenAI's usage-only chunk: `data: {... "choices": [], "usage": {...}}`.
local function usage_only(event)
    if not find(event, '"usage"', 1, true) then return false end
    local data = {}
    for line in string.gmatch(event, "[^\r\n]+") do
        local v = match(line, "^data: ?(.*)$")
        if v then data[#data + 1] = v end
    end
    if #data == 0 then return false end
    local doc = cjson.decode(concat(data, "\n"))
    return type(doc) == "table" and type(doc.usage) == "table" and type(doc.choices) == "table"
        and next(doc.choices) == nil
end

-- SSE: pass each complete event (LF, CRLF or CR line ends), the usage-only one dropped when kgate added it,
-- the model renamed; an incomplete event waits for its end.
local function filter_sse(k, chunk, eof)
    local buf = k.pending .. chunk
    local out, pos = {}, 1
    while true do
        local s, e = find(buf, "\n\r?\n", pos)
        local s2, e2 = find(buf, "\r\r", pos, true)
        if s2 and (not s or s2 < s) then s, e = s2, e2 end
        if not s then break end
        local event = sub(buf, pos, e)
        pos = e + 1
        if not (k.strip and usage_only(event)) then
            out[#out + 1] = #k.rename > 0 and rename(k.rename, event) or event
        end
    end
    local rest = sub(buf, pos)
    if eof and #rest > 0 then
        if not (k.strip and usage_only(rest)) then
            out[#out + 1] = #k.rename > 0 and rename(k.rename, rest) or rest
        end
        rest = ""
    end
    k.pending = rest
    return concat(out)
end

-- Any other stream (Gemini's JSON array): rename, holding back a tail that could begin a name.
local function filter_plain_stream(k, chunk, eof)
    local buf = rename(k.rename, k.pending .. chunk)
    if eof then
        k.pending = ""
        return buf
    end
    local hold = 0
    for _, p in ipairs(k.rename) do
        if #p[1] - 1 > hold then hold = #p[1] - 1 end
    end
    if #buf <= hold then
        k.pending = buf
        return ""
    end
    k.pending = sub(buf, #buf - hold + 1)
    return sub(buf, 1, #buf - hold)
end

local function filter_client(k, chunk, eof)
    if k.stream then
        if k.sse then
            return filter_sse(k, chunk, eof)
        end
        return filter_plain_stream(k, chunk, eof)
    end
    -- a unary answer: renamed whole, at its end
    local parts = k.parts
    if #chunk > 0 then parts[#parts + 1] = chunk end
    if not eof then return "" end
    k.parts = {}
    return rename(k.rename, concat(parts))
end

function _M.body_filter()
    local k = ngx.ctx.kgate
    if not k or (k.mode ~= "metered" and k.mode ~= "unmetered") then return end
    local chunk, eof = ngx.arg[1], ngx.arg[2]
    if k.error_body then  -- nginx's own error page, replaced by the API's shape
        ngx.arg[1] = k.error_sent and "" or k.error_body
        k.error_sent = true
        return
    end
    if k.mode == "metered" and k.answered then
        if #chunk > 0 then
            k.last_data = ngx.now()
            k.tail_flush = false
            local seg = k.seg
            seg[#seg + 1] = chunk
            k.seglen = k.seglen + #chunk
            if k.seglen >= opts.segment_bytes then
                flush_segment(k)
            end
        elseif not eof then
            -- nginx passes an empty flush buffer after the upstream broke off an answer it had begun
            -- (ngx_http_upstream_finalize_request with the header sent): the end was the upstream's
            k.tail_flush = true
        end
        if eof then k.eof = true end
    end
    if k.filter then
        ngx.arg[1] = filter_client(k, chunk, eof)
    end
end

-- ------------------------------------------------------------------------------------------------------------
-- log

local function outcome_of(k)
    if k.answered then
        if k.eof then return "complete" end
        -- Cut part-way. nginx keeps the status it sent (200) whoever cut: the upstream's break shows as the
        -- empty flush buffer nginx sends after it (k.tail_flush), a stall as the silence before it.
        if k.tail_flush then
            local quiet = (ngx.now() - (k.last_data or 0)) * 1000
            if quiet >= opts.read_timeout_ms * 0.95 then return "upstream_timeout" end
            return "upstream_broken"
        end
        return "client_disconnected"
    end
    local status = ngx.status
    if not ngx_var.upstream_addr then
        return "not_sent"  -- nginx never tried an upstream (an error before proxying)
    end
    local connect = last_value(ngx_var.upstream_connect_time)
    if connect == nil or connect == "-" then
        return status == 499 and "not_sent" or "upstream_unreachable"
    end
    if status == 504 then return "upstream_timeout" end
    if status == 499 then return "client_disconnected" end
    return "upstream_broken"
end

function _M.log()
    local k = ngx.ctx.kgate
    if not k or k.mode ~= "metered" then return end
    local outcome = outcome_of(k)
    flush_segment(k)
    enqueue(k, { offset = k.offset, final = true, status = k.answered and k.status or nil, outcome = outcome })
    if outcome ~= "complete" then
        ngx_log(INFO, "kgate: request ", k.rid, " ended: ", outcome, " after ", k.offset, " bytes")
    end
end

-- For tests and tools: the options in force.
function _M.options()
    return opts
end

return _M
