"""The budget ledger in Redis: Lua scripts, their codec, the Redis clients, the spool, embedded Redis."""
