-- release: void a request (it never ran). Releases the hold, or takes back the charge a lease expiry
-- made, and marks the request released: idempotent, a later settle of it is a repeat, and an unknown id
-- is marked too, so a reserve that arrives late cannot hold for it.
-- With `forget` (rolling back a reserve that another scope refused, or that failed) the record is
-- deleted instead of marked: the request is as if never reserved here, and a later settle (shadow
-- mode, spool replay) posts its usage.
-- KEYS[1] scope base; ARGV as lib.lua says, option = forget ('1'|'0'), no budgets.
-- Reply: {outcome, now}; outcome 'released', 'unknown' or 'repeat'.
local base = KEYS[1]
local now, now_s, charge, ttl, rid, option = read_call()
local forget = option == '1'
reap(base, now, now_s, charge, ttl, true)

local raw = redis.call('HGET', base .. ':rec', rid)
if raw == 'S' or raw == 'R' then
  return { 'repeat', now_s }
end
local outcome = 'unknown'
if raw then
  undo(base, rid, raw)
  outcome = 'released'
end
if forget then
  if raw then
    redis.call('HDEL', base .. ':rec', rid)
    redis.call('ZREM', base .. ':fin', rid)
  end
else
  finish(base, rid, 'R', now_s, ttl)
end
return { outcome, now_s }
