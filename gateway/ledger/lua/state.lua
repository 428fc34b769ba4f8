-- state: usage, holds and reset time of budgets of one scope (admin API, headers). Reaps expired
-- leases like every script, so what it reports is current.
-- KEYS[1] scope base; ARGV as lib.lua says (no request id, no option; the amounts are ignored).
-- Reply: {'state', now, used, held, reset_at ...}
local base = KEYS[1]
local now, now_s, charge, ttl, _, _, budgets = read_call()
reap(base, now, now_s, charge, ttl, true)
return report('state', base, budgets, now, now_s)
