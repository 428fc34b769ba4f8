-- release: void a request (it never ran, or an earlier scope's hold is rolled back). Releases the hold,
-- or takes back the charge a lease expiry made. Idempotent per request id; an unknown id is marked
-- released too, so a reserve that arrives late cannot hold for it.
-- KEYS[1] scope base
-- ARGV: now ('' = Redis TIME), request id, lease expiry mode, record ttl seconds
-- Reply: {outcome, now}; outcome 'released', 'unknown' or 'repeat'.
local base = KEYS[1]
local now = clock(ARGV[1])
local rid = ARGV[2]
local ttl = tonumber(ARGV[4])
reap(base, now, ARGV[3] == 'charge', ttl)

local raw = redis.call('HGET', base .. ':rec', rid)
if raw == 'S' or raw == 'R' then
  return { 'repeat', fmt(now) }
end
local outcome = 'unknown'
if raw then
  undo(base, rid, raw)
  outcome = 'released'
end
finish(base, rid, 'R', now, ttl)
return { outcome, fmt(now) }
