-- settle_batch: end a batch of requests admitted from one replica's slice of a scope's budgets (a slice is
-- a hold like any request's; docs/design.md §3.7). Posts the batch's actual usage to the current windows and
-- shrinks the slice's hold by what the batch's requests held (and by any unused part being returned).
-- Idempotent per batch id: a retried batch changes nothing.
-- KEYS[1] scope base; ARGV as lib.lua says, request id = the batch id, option = '<slice id> <reduction>...'
-- (one reduction per budget, in the budgets' order), each budget's amount = the batch's actual.
-- Reply: {outcome, now}; outcome 'applied' (the slice's hold shrank), 'charged' (the slice had expired and
-- been charged: the reduction is taken back from that charge), 'posted' (no live record of the slice) or
-- 'repeat'.
local base = KEYS[1]
local now, now_s, charge, ttl, batch, option, budgets = read_call()
reap(base, now, now_s, charge, ttl, true)

local recs = base .. ':rec'
if redis.call('HEXISTS', recs, batch) == 1 then return { 'repeat', now_s } end
local words = {}
for w in string.gmatch(option, '%S+') do words[#words + 1] = w end
local slice = words[1]
local cut = {}
for i, b in ipairs(budgets) do cut[b.label] = (words[i + 1] or '0') + 0 end

local outcome = 'posted'
local raw = redis.call('HGET', recs, slice)
if raw and string.sub(raw, 1, 1) == '{' then
  local rec = cjson.decode(raw)
  local labels, deltas = {}, {}
  for _, r in ipairs(rec.b) do
    local have = r[4] + 0
    local take = math.min(have, cut[r[1]] or 0)
    if take > 0 then
      r[4] = fmt(have - take)
      if rec.s == 'h' then
        labels[#labels + 1], deltas[#deltas + 1] = r[1], -take
      elseif rec.s == 'c' and r[5] then
        take_back(r[5], r[6], take)
      end
    end
  end
  change_held(base, labels, deltas)
  redis.call('HSET', recs, slice, cjson.encode(rec))
  outcome = rec.s == 'h' and 'applied' or (rec.s == 'c' and 'charged' or 'posted')
end
for _, b in ipairs(budgets) do
  if b.amount > 0 then add_usage(base, b, now, b.amount, now) end
end
finish(base, batch, 'S', now_s, ttl)
return { outcome, now_s }
