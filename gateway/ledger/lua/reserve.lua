-- reserve: check every budget of one scope and hold the amounts on all of them, or on none.
-- KEYS[1] scope base (carries the hash tag)
-- ARGV: now ('' = Redis TIME), request id, lease seconds, lease expiry mode ('charge'|'release'),
--       record ttl seconds, then per budget: budget ('<window> <rolling> <limit> <label>'), amount
-- Reply: {'ok', now, used, held, reset_at ...} with the state after the hold (a retried reserve of a
-- request still held answers 'ok' without holding twice); {'refused', now, index, used, held, retry_at};
-- {'dup', now} when the request id already finished.
local base = KEYS[1]
local now = clock(ARGV[1])
local now_s = fmt(now)
local rid = ARGV[2]
local lease = ARGV[3] + 0
local ttl = ARGV[5] + 0
local budgets = read_budgets(6)
reap(base, now, now_s, ARGV[4] == 'charge', ttl)

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
for i, b in ipairs(budgets) do
  local used, reset_at, live = usage(base, b, now)
  local h = held[i]
  if b.amount > 0 and used + h + b.amount > b.limit then
    return { 'refused', now_s, tostring(i), fmt(used), fmt(h), fmt(retry_at(b, now, used, h, reset_at, live)) }
  end
  out[#out + 1] = reply_num(used)
  out[#out + 1] = fmt(h + b.amount)  -- text: it is also written to the held hash below
  out[#out + 1] = reply_num(reset_at)
end

local record, fields = {}, {}
for i, b in ipairs(budgets) do
  if b.amount > 0 then
    fields[#fields + 1] = b.label
    fields[#fields + 1] = out[3 * i + 1]  -- the held amount after this hold, formatted above
    record[#record + 1] = { b.label, b.window, b.rolling and '1' or '0', b.amount_s }
  end
end
if #fields > 0 then redis.call('HSET', base .. ':held', unpack(fields)) end
local expiry_s = fmt(now + lease)
redis.call('HSET', recs, rid, cjson.encode({ e = expiry_s, s = 'h', b = record }))
redis.call('ZADD', base .. ':leases', expiry_s, rid)
local ms = math.ceil((lease + ttl) * 1000)
keep_alive(base .. ':held', ms)
keep_alive(recs, ms)
keep_alive(base .. ':leases', ms)
return out
