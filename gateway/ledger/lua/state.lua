-- state: usage, holds and reset time of budgets of one scope (admin API, headers). Reaps expired
-- leases like every script, so what it reports is current.
-- KEYS[1] scope base
-- ARGV: now ('' = Redis TIME), lease expiry mode, record ttl seconds,
--       then per budget: budget ('<window> <rolling> <limit> <label>'), amount (ignored)
-- Reply: {'state', now, used, held, reset_at ...}
local base = KEYS[1]
local now = clock(ARGV[1])
local now_s = fmt(now)
reap(base, now, now_s, ARGV[2] == 'charge', ARGV[3] + 0, true)
return report('state', base, read_budgets(4), now, now_s)
