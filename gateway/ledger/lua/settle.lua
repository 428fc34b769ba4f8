-- settle: end a request with its actual usage. Releases the hold (or takes back the charge a lease
-- expiry made) and adds the actual to the current windows. Idempotent per request id.
-- KEYS[1] scope base; ARGV as lib.lua says, option = report ('1'|'0'), each budget's amount = its actual.
-- Reply: {outcome, now, used, held, reset_at ...} (with report '0' only {outcome, now}: the gateway's
-- request path does not read the state, and reading it back costs Redis a third of this script);
-- outcome 'applied' (a hold or an expired hold was found), 'posted' (no record: the actual is added all
-- the same, e.g. usage replayed from a spool) or 'repeat' (already settled or released: nothing changed).
local base = KEYS[1]
local now, now_s, charge, ttl, rid, option, budgets = read_call()
local want_report = option == '1'
reap(base, now, now_s, charge, ttl, true)

local raw = redis.call('HGET', base .. ':rec', rid)
if raw == 'S' or raw == 'R' then
  if not want_report then return { 'repeat', now_s } end
  return report('repeat', base, budgets, now, now_s)
end
local outcome = 'posted'
if raw then
  undo(base, rid, raw)
  outcome = 'applied'
end
for _, b in ipairs(budgets) do
  if b.amount > 0 then add_usage(base, b, now, b.amount, now) end
end
finish(base, rid, 'S', now_s, ttl)
if not want_report then return { outcome, now_s } end
return report(outcome, base, budgets, now, now_s)
