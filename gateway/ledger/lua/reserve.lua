-- reserve: check every budget of one scope and hold the amounts on all of them, or on none.
-- KEYS[1] scope base (carries the hash tag); ARGV as lib.lua says, option = lease seconds.
-- Reply: {'ok', now, used, held, reset_at ...} with the state after the hold (a retried reserve of a
-- request still held answers 'ok' without holding twice); {'refused', now, index, used, held, retry_at};
-- {'dup', now} when the request id already finished.
local base = KEYS[1]
local now, now_s, charge, ttl, rid, option, budgets = read_call()
local lease = option + 0
reap(base, now, now_s, charge, ttl)

local recs = base .. ':rec'
local existing = redis.call('HGET', recs, rid)
if existing then
  if string.sub(existing, 1, 1) == '{' and cjson.decode(existing).s == 'h' then
    return report('ok', base, budgets, now, now_s)
  end
  return { 'dup', now_s }
end

local held = read_held(base, labels_of(budgets))
local out = { 'ok', now_s }
local fields, entries = {}, {}  -- the held hash's new amounts, the record's budget entries
for i, b in ipairs(budgets) do
  local used, reset_at, live = usage(base, b, now)
  local h = held[i]
  if b.amount > 0 and used + h + b.amount > b.limit then
    return { 'refused', now_s, tostring(i), fmt(used), fmt(h), fmt(retry_at(b, now, used, h, reset_at, live)) }
  end
  local held_s = fmt(h + b.amount)  -- text: it goes into the reply and into the held hash
  local n = #out  -- budget i's figures: used, held (after this hold), reset_at
  out[n + 1], out[n + 2], out[n + 3] = reply_num(used), held_s, reply_num(reset_at)
  if b.amount > 0 then
    fields[#fields + 1] = b.label
    fields[#fields + 1] = held_s
    entries[#entries + 1] = { b.label, b.window, b.rolling and '1' or '0', b.amount_s }
  end
end

if #fields > 0 then redis.call('HSET', base .. ':held', unpack(fields)) end
local expiry_s = fmt(now + lease)  -- the record in its stored format (lib.lua, "Hold records"): held
redis.call('HSET', recs, rid, cjson.encode({ e = expiry_s, s = 'h', b = entries }))
redis.call('ZADD', base .. ':leases', expiry_s, rid)
local ms = math.ceil((lease + ttl) * 1000)
keep_alive(base .. ':held', ms)
keep_alive(recs, ms)
keep_alive(base .. ':leases', ms)
return out
