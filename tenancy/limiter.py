"""The per-department limiter: one atomic Lua script per admission, all keys of a department
under one hash tag ``{dept:<id>}``, time taken from Redis (``TIME``), never from the host.

- requests per minute: GCRA (a burst of at most a sixth of the minute, no doubling at window edges);
- tokens per minute and the day/month budgets: ``prompt_tokens + max_tokens`` reserved at admission,
  settled to the real usage when the response ends, released (settled to 0) on error;
- concurrency: leases in a sorted set scored by their expiry, released in ``finally``, expired
  ones reclaimed by the next admission.

A key with limits of its own (rpm, tpm, concurrency) has its own counters beside the department's,
in the same script and hash tag: its requests must pass both, so a key's limit only ever narrows.

Redis unreachable → denied with the distinct reason ``redis_unavailable`` (the gateway answers 503);
there is no per-process fallback.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import redis
import redis.asyncio
import redis.asyncio.client

ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local day_budget, month_budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local max_conc, reserve = tonumber(ARGV[5]), tonumber(ARGV[6])
local lease, lease_ttl = ARGV[7], tonumber(ARGV[8])
local day_ttl, month_ttl = tonumber(ARGV[9]), tonumber(ARGV[10])
local key_rpm, key_tpm, key_conc = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
-- the day and month of the budgets: Redis's clock, in the appliance's time zone (ARGV[14]: its offset
-- from UTC in seconds), the civil date computed here (days since 1970 → year, month, day)
local days = math.floor((tonumber(t[1]) + tonumber(ARGV[14])) / 86400) + 719468
local era = math.floor(days / 146097)
local doe = days - era * 146097
local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
local mp = math.floor((5 * doy + 2) / 153)
local dd = doy - math.floor((153 * mp + 2) / 5) + 1
local mm = mp < 10 and mp + 3 or mp - 9
local yy = yoe + era * 400 + (mm <= 2 and 1 or 0)
KEYS[3] = KEYS[3] .. string.format('%04d%02d%02d', yy, mm, dd)
KEYS[4] = KEYS[4] .. string.format('%04d%02d', yy, mm)
local rem_rpm, rem_tpm, rem_day, rem_month = -1, -1, -1, -1
local writes = {}

local function least(current, value)
  if current < 0 then return value end
  return math.min(current, value)
end

-- requests per minute (GCRA), for the department and then for the key's own, narrower limit
for _, spec in ipairs({{1, rpm, 'rpm'}, {6, key_rpm, 'key_rpm'}}) do
  local limit = spec[2]
  if limit > 0 then
    local period = 60000 / limit
    local tau = (math.max(1, math.ceil(limit / 6)) - 1) * period
    local tat = tonumber(redis.call('GET', KEYS[spec[1]])) or now
    if tat < now then tat = now end
    if tat - now > tau then return {0, spec[3], math.ceil(tat - now - tau), 0, -1, -1, -1} end
    local new = tat + period
    writes[#writes + 1] = {KEYS[spec[1]], new, math.ceil(new - now + period)}
    -- what is left of the minute's limit (the header beside it says the limit per minute); a burst
    -- of up to a sixth of it may be sent at once, the rest as the minute goes on
    rem_rpm = least(rem_rpm, math.max(0, math.floor((60000 - (new - now)) / period + 0.001)))
  end
end

-- tokens per minute: the reservation advances a GCRA clock by reserve * (60 s / tpm)
for _, spec in ipairs({{2, tpm, 'tpm'}, {7, key_tpm, 'key_tpm'}}) do
  local limit = spec[2]
  if limit > 0 then
    if reserve > limit then return {0, 'tpm_request_too_large', -1, rem_rpm, 0, -1, -1} end
    local per_token = 60000 / limit
    local tat = tonumber(redis.call('GET', KEYS[spec[1]])) or now
    if tat < now then tat = now end
    local new = tat + reserve * per_token
    if new - now > 60000 then return {0, spec[3], math.ceil(new - now - 60000), rem_rpm, 0, -1, -1} end
    writes[#writes + 1] = {KEYS[spec[1]], new, math.ceil(new - now + 1000)}
    rem_tpm = least(rem_tpm, math.floor((60000 - (new - now)) / per_token))
  end
end

if day_budget > 0 then
  local used = tonumber(redis.call('GET', KEYS[3])) or 0
  if used + reserve > day_budget then
    return {0, 'tokens_per_day', math.max(redis.call('PTTL', KEYS[3]), 1000), rem_rpm, rem_tpm, 0, -1}
  end
  rem_day = day_budget - used - reserve
end
if month_budget > 0 then
  local used = tonumber(redis.call('GET', KEYS[4])) or 0
  if used + reserve > month_budget then
    return {0, 'tokens_per_month', math.max(redis.call('PTTL', KEYS[4]), 1000), rem_rpm, rem_tpm, rem_day, 0}
  end
  rem_month = month_budget - used - reserve
end
for _, spec in ipairs({{5, max_conc, 'concurrency'}, {8, key_conc, 'key_concurrency'}}) do
  if spec[2] > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[spec[1]], '-inf', now)
    if redis.call('ZCARD', KEYS[spec[1]]) >= spec[2] then
      return {0, spec[3], 1000, rem_rpm, rem_tpm, rem_day, rem_month}
    end
  end
end

-- every check passed: take what was asked for
for _, w in ipairs(writes) do redis.call('SET', w[1], string.format('%.3f', w[2]), 'PX', w[3]) end
if day_budget > 0 or month_budget > 0 or reserve > 0 then
  redis.call('INCRBY', KEYS[3], reserve)
  redis.call('EXPIRE', KEYS[3], day_ttl, 'NX')
  redis.call('INCRBY', KEYS[4], reserve)
  redis.call('EXPIRE', KEYS[4], month_ttl, 'NX')
end
if max_conc > 0 then redis.call('ZADD', KEYS[5], now + lease_ttl, lease) end
if key_conc > 0 then redis.call('ZADD', KEYS[8], now + lease_ttl, lease) end
return {1, '', 0, rem_rpm, rem_tpm, rem_day, rem_month, KEYS[3], KEYS[4]}
"""

SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tpm, delta, lease, key_tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
if delta ~= 0 then
  for _, spec in ipairs({{1, tpm}, {5, key_tpm}}) do
    local tat = spec[2] > 0 and tonumber(redis.call('GET', KEYS[spec[1]]))
    if tat then
      tat = math.max(tat + delta * 60000 / spec[2], now)
      redis.call('SET', KEYS[spec[1]], string.format('%.3f', tat), 'PX', math.ceil(tat - now + 1000))
    end
  end
  for i = 2, 3 do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      if redis.call('INCRBY', KEYS[i], delta) < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
    end
  end
end
if lease ~= '' then
  redis.call('ZREM', KEYS[4], lease)
  redis.call('ZREM', KEYS[6], lease)
end
return 1
"""


@dataclass(frozen=True)
class Limits:
    """A department's limits (a key may narrow them); None means unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    concurrency: int | None = None

    def narrowed(self, other: Limits) -> Limits:
        """The stricter of the two for each limit (a key can only narrow its department's)."""

        def pick(a: int | None, b: int | None) -> int | None:
            return b if a is None else a if b is None else min(a, b)

        return Limits(*(pick(getattr(self, f), getattr(other, f)) for f in self.__dataclass_fields__))


@dataclass
class Decision:
    allowed: bool
    limit: str = ""  # which limit denied: rpm, tpm, tpm_request_too_large, tokens_per_day, …, redis_unavailable
    retry_after: float | None = None  # seconds
    remaining: dict[str, int] = field(default_factory=dict)
    lease: str = ""
    reserved: int = 0
    key_id: int | None = None  # the key's own counters, when it has limits of its own
    key_tpm: int = 0
    day_key: str = ""  # the budget counters the admission charged
    month_key: str = ""


NO_KEY_LIMITS = Limits()


def _keys(department_id: int, key_id: int | None = None) -> list[str]:
    """The department's counters, then the key's own (same hash tag: one slot, one script). The day
    and month counters are prefixes: the admission script appends the date by Redis's clock."""
    tag = f"{{dept:{department_id}}}"
    own = f"lim:{tag}:key:{'-' if key_id is None else key_id}"
    return [f"lim:{tag}:rpm", f"lim:{tag}:tpm", f"lim:{tag}:day:", f"lim:{tag}:month:",
            f"lim:{tag}:leases", f"{own}:rpm", f"{own}:tpm", f"{own}:leases"]  # fmt: skip


def utc_offset_seconds(at: datetime | None = None) -> int:
    """The appliance's time zone's offset from UTC now: budget days and months are its days and months."""
    from django.conf import settings

    moment = (at or datetime.now(UTC)).astimezone(ZoneInfo(settings.TIME_ZONE))
    offset = moment.utcoffset()
    return int(offset.total_seconds()) if offset else 0


def budget_suffixes(epoch_seconds: float) -> tuple[str, str]:
    """The day and month a budget counter is named after, at a moment of Redis's clock."""
    from django.conf import settings

    local = datetime.fromtimestamp(epoch_seconds, ZoneInfo(settings.TIME_ZONE))
    return f"{local:%Y%m%d}", f"{local:%Y%m}"


def _admit_args(limits: Limits, key_limits: Limits, reserve_tokens: int, lease_seconds: float) -> tuple[str, list]:
    lease = secrets.token_hex(8) if limits.concurrency or key_limits.concurrency else ""
    args = [limits.rpm or 0, limits.tpm or 0, limits.tokens_per_day or 0, limits.tokens_per_month or 0,
            limits.concurrency or 0, max(0, int(reserve_tokens)), lease, int(lease_seconds * 1000),
            2 * 86400, 33 * 86400, key_limits.rpm or 0, key_limits.tpm or 0, key_limits.concurrency or 0,
            utc_offset_seconds()]  # fmt: skip
    return lease, args


def _decision(result: list, lease: str, reserve_tokens: int, key_id: int | None, key_limits: Limits) -> Decision:
    allowed, limit, retry_ms, *remaining = result
    budget_keys = [k.decode() if isinstance(k, bytes) else str(k) for k in remaining[4:]]
    remaining = remaining[:4]
    names = ("requests", "tokens", "tokens_per_day", "tokens_per_month")
    decision = Decision(
        bool(allowed),
        limit.decode() if isinstance(limit, bytes) else str(limit),
        retry_after=None if int(retry_ms) < 0 else math.ceil(int(retry_ms)) / 1000,
        remaining={name: int(value) for name, value in zip(names, remaining, strict=True) if int(value) >= 0},
    )
    if decision.allowed:
        decision.lease, decision.reserved = lease, max(0, int(reserve_tokens))
        decision.key_id, decision.key_tpm = key_id, key_limits.tpm or 0
        decision.day_key, decision.month_key = budget_keys
    return decision


def settle_call(department_id: int, limits: Limits, decision: Decision, used_tokens: int) -> tuple[list, list]:
    """The settle script's keys and arguments: plain strings and numbers, so that a settlement Redis
    refused can be spooled and sent later. The day and month counters are the ones the admission
    charged, whatever the date is when the answer ends."""
    keys = _keys(department_id, decision.key_id)
    delta = max(0, int(used_tokens)) - decision.reserved
    return [keys[1], decision.day_key, decision.month_key, keys[4], keys[6], keys[7]], [
        limits.tpm or 0, delta, decision.lease, decision.key_tpm]  # fmt: skip


class Limiter:
    """The limiter over a synchronous redis-py client (console, tasks, tests)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.admit_script = client.register_script(ADMIT)  # EVALSHA, loading the script when Redis lost it
        self.settle_script = client.register_script(SETTLE)

    def admit(
        self, department_id: int, limits: Limits, reserve_tokens: int, lease_seconds: float = 600,
        key_id: int | None = None, key_limits: Limits = NO_KEY_LIMITS,
    ) -> Decision:  # fmt: skip
        """Admit one request of a department (and of its key, when the key has limits of its own)."""
        lease, args = _admit_args(limits, key_limits, reserve_tokens, lease_seconds)
        try:
            result = self.admit_script(keys=_keys(department_id, key_id), args=args)
        except redis.RedisError:
            return Decision(False, "redis_unavailable", retry_after=1.0)
        return _decision(result, lease, reserve_tokens, key_id, key_limits)

    def settle(self, department_id: int, limits: Limits, decision: Decision, used_tokens: int) -> None:
        """Correct the reservation to the real usage (both ways) and release the lease."""
        keys, args = settle_call(department_id, limits, decision, used_tokens)
        self.settle_script(keys=keys, args=args)

    def budgets_used(self, department_ids: list[int]) -> dict[int, tuple[int, int]]:
        """Tokens each department has used (reservations in flight included) today and this month,
        by the counters the admission checks: {department id: (day, month)}. One round trip."""
        seconds, _micro = self.client.time()
        day, month = budget_suffixes(seconds)
        pipe = self.client.pipeline(transaction=False)
        for department_id in department_ids:
            keys = _keys(department_id)
            pipe.get(keys[2] + day)
            pipe.get(keys[3] + month)
        values = [int(v or 0) for v in pipe.execute()]
        return {d: (values[2 * i], values[2 * i + 1]) for i, d in enumerate(department_ids)}

    def release(self, department_id: int, limits: Limits, decision: Decision) -> None:
        """The request failed before any token was produced: give everything back."""
        self.settle(department_id, limits, decision, 0)

    def rebuild_budgets(self, department_id: int, day_used: int, month_used: int) -> None:
        """After Redis lost its data: add the usage records' totals to the day/month counters (which
        hold only what was admitted since the loss, if anything)."""
        keys = _keys(department_id)
        seconds, micros = self.client.time()
        day, month = budget_suffixes(seconds + micros / 1e6)
        pipe = self.client.pipeline(transaction=True)
        pipe.incrby(keys[2] + day, int(day_used)).expire(keys[2] + day, 2 * 86400, nx=True)
        pipe.incrby(keys[3] + month, int(month_used)).expire(keys[3] + month, 33 * 86400, nx=True)
        pipe.execute()


class AsyncLimiter:
    """The same scripts over redis-py's asyncio client (the gateway): one round trip per admission;
    ``settle`` can ride in a pipeline with the usage record (``settle_in``)."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self.admit_script = client.register_script(ADMIT)
        self.settle_script = client.register_script(SETTLE)

    async def admit(
        self, department_id: int, limits: Limits, reserve_tokens: int, lease_seconds: float = 600,
        key_id: int | None = None, key_limits: Limits = NO_KEY_LIMITS,
    ) -> Decision:  # fmt: skip
        lease, args = _admit_args(limits, key_limits, reserve_tokens, lease_seconds)
        keys = _keys(department_id, key_id)
        try:
            try:
                result = await self.admit_script(keys=keys, args=args)
            except (redis.ConnectionError, ConnectionError):
                # A pooled connection to a Redis that restarted fails once; the pool has dropped it, so
                # the same request goes again on a fresh one (a Redis that is down refuses that too).
                result = await self.admit_script(keys=keys, args=args)
        except (redis.RedisError, OSError):
            return Decision(False, "redis_unavailable", retry_after=1.0)
        return _decision(result, lease, reserve_tokens, key_id, key_limits)

    def settle_in(
        self, pipe: redis.asyncio.client.Pipeline, department_id: int, limits: Limits, decision: Decision, used: int
    ) -> None:
        """Queue the settlement on ``pipe`` (executed by the caller, with whatever else it carries). When
        Redis lost the script meanwhile the pipeline raises NoScriptError: call ``settle`` then."""
        keys, args = settle_call(department_id, limits, decision, used)
        pipe.evalsha(self.settle_script.sha, len(keys), *keys, *args)

    async def settle(self, department_id: int, limits: Limits, decision: Decision, used: int) -> None:
        keys, args = settle_call(department_id, limits, decision, used)
        await self.settle_script(keys=keys, args=args)

    settle_call = staticmethod(settle_call)

    def settle_raw_in(self, pipe: redis.asyncio.client.Pipeline, keys: list, args: list) -> None:
        """Queue a settlement made by ``settle_call`` (perhaps spooled a while ago) on ``pipe``."""
        pipe.evalsha(self.settle_script.sha, len(keys), *keys, *args)

    async def settle_raw(self, keys: list, args: list) -> None:
        await self.settle_script(keys=keys, args=args)
