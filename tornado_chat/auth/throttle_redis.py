"""The login throttle shared by every node through Redis (with ``--broker redis://...``).

Keys, under the broker's prefix: ``{prefix}:login:user:{sha256}``,
``{prefix}:login:pair:{sha256}`` and ``{prefix}:login:addr:{sha256}``
(hashes), failures of a username, of a username from one address, or of a
client address, and ``{prefix}:register:addr:{sha256}`` (a string), when the
registration budget of a client address is whole again; each keyed by the
SHA-256 of what :class:`~tornado_chat.auth.throttle.LoginThrottle` would
count it as, and expiring once it can no longer block or count. This module
owns its Lua scripts and runs them on the broker's command connection through
redis-py's script objects (``EVALSHA``, loading the script again after a Redis
restart).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from tornado_chat.auth.throttle import (
    MAX_FAILURES,
    PENDING_TTL,
    REGISTER_BURST,
    REGISTER_PER_HOUR,
    USER_MAX_FAILURES,
    LoginThrottle,
    refuse_login,
    refuse_registration,
    refuse_registration_budget,
    throttle_address_key,
    throttle_pair_key,
    throttle_user_key,
)

if TYPE_CHECKING:
    from tornado_chat.redis_broker import RedisOptions

__all__ = ["RedisLink", "RedisLoginThrottle"]

log = logging.getLogger("tornado_chat.auth")

# A login waits at most this long for the shared throttle before this
# process's own throttle decides instead (Redis answers in a millisecond or
# two; anything slower is an outage as far as a login is concerned).
LOGIN_THROTTLE_TIMEOUT = 0.5


# The login throttle (RedisLoginThrottle): the policy of
# tornado_chat.auth.throttle.LoginThrottle, in milliseconds. A key is a hash of
# n (failures in the current window), last (time of the latest failure), until
# (blocked until), p (failures reserved by password checks in progress) and
# pt (when p last changed: p stops counting PENDING_TTL after it). ARGV[1] is
# the time in ms, or '' for Redis's own clock (what the server uses: every
# node agrees with it).
_LOGIN_CLOCK = (
    """
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[1])
end
local now_text = string.format('%.0f', now)
local PENDING_TTL = """
    + str(round(PENDING_TTL * 1000))
    + """
local function wait_of(keys)
  local wait = 0
  for _, key in ipairs(keys) do
    local blocked = tonumber(redis.call('HGET', key, 'until'))
    if blocked and blocked - now > wait then wait = blocked - now end
  end
  return wait
end
local function pending_of(key)
  local e = redis.call('HMGET', key, 'p', 'pt')
  local p, pt = tonumber(e[1]), tonumber(e[2])
  if not p or not pt or now - pt > PENDING_TTL then return 0 end
  return p
end
local function release(key)
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'p', math.max(0, pending_of(key) - 1), 'pt', now_text)
  end
end
-- Each key lives until it can neither block nor count (plus a second).
local function keep(key, window, blocked)
  local ttl = math.max(window, blocked - now, PENDING_TTL) + 1000
  redis.call('PEXPIRE', key, string.format('%.0f', ttl))
end
"""
)

# KEYS: user key, pair key, address key. ARGV: now, base delay ms, window ms,
# the user's threshold, the pair's. Refuses (returns the wait in ms) while a
# key is blocked, or with the base delay while the user's or the pair's
# reservations take every failure left before its threshold (at least one is
# left: past the limit, one check at a time); otherwise reserves one failure
# of the user and of the pair and returns 0.
LOGIN_ADMIT_LUA = (
    _LOGIN_CLOCK
    + """
local wait = wait_of(KEYS)
if wait > 0 then return wait end
local base, window = tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, 2 do
  local e = redis.call('HMGET', KEYS[i], 'n', 'last')
  local n, last = tonumber(e[1]), tonumber(e[2])
  if not n or not last or now - last > window then n = 0 end
  if pending_of(KEYS[i]) >= math.max(1, tonumber(ARGV[3 + i]) - n) then return base end
end
for i = 1, 2 do
  local p = pending_of(KEYS[i]) + 1
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('HSET', KEYS[i], 'n', 0, 'last', now_text, 'until', 0)
  end
  redis.call('HSET', KEYS[i], 'p', p, 'pt', now_text)
  keep(KEYS[i], window, tonumber(redis.call('HGET', KEYS[i], 'until')) or 0)
end
return 0
"""
)

# KEYS: the keys to charge. ARGV: now, '1' to refuse (return the wait, count
# nothing) when a key is blocked already, how many leading keys hold a
# reservation to release first, base delay ms, max delay ms, window ms, then
# each key's threshold (failures before it blocks), in KEYS order. Returns the
# wait in ms, 0 when the failure was counted.
LOGIN_FAIL_LUA = (
    _LOGIN_CLOCK
    + """
for i = 1, tonumber(ARGV[3]) do release(KEYS[i]) end
if ARGV[2] == '1' then
  local wait = wait_of(KEYS)
  if wait > 0 then return wait end
end
local base, cap, window = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
for i, key in ipairs(KEYS) do
  local max_failures = tonumber(ARGV[6 + i])
  local e = redis.call('HMGET', key, 'n', 'last', 'until')
  local n, last, blocked = tonumber(e[1]), tonumber(e[2]), tonumber(e[3])
  if not n or not last or not blocked or now - last > window then
    n, blocked = 0, 0
  end
  n = n + 1
  local excess = n - max_failures
  if excess >= 0 then
    local delay = math.floor(math.min(cap, base * 2 ^ math.min(excess, 32)))
    blocked = math.max(blocked, now + delay)
  end
  redis.call('HSET', key, 'n', n, 'last', now_text, 'until', string.format('%.0f', blocked))
  keep(key, window, blocked)
end
return 0
"""
)

# KEYS: user key, pair key, address key. ARGV: now. Releases the reservation
# of the user and the pair; refuses (returns the wait in ms) while any key is
# blocked; otherwise forgets the user's and the pair's failures (keeping the
# reservations of other checks in progress), never the address's (or one's
# own account would reset a guessing address).
LOGIN_OK_LUA = (
    _LOGIN_CLOCK
    + """
release(KEYS[1])
release(KEYS[2])
local wait = wait_of(KEYS)
if wait > 0 then return wait end
for i = 1, 2 do
  if pending_of(KEYS[i]) > 0 then
    redis.call('HSET', KEYS[i], 'n', 0, 'until', 0)
  else
    redis.call('DEL', KEYS[i])
  end
end
return 0
"""
)

# KEYS: user key, pair key. ARGV: now. Releases their reservation; returns 0.
LOGIN_RELEASE_LUA = _LOGIN_CLOCK + "release(KEYS[1])\nrelease(KEYS[2])\nreturn 0\n"

# The registration budget (LoginThrottle.spend_registration's): a key holds
# the time its address's budget is whole again, in ms. ARGV after now: ms per
# registration, and the burst's span (burst times that).
_BUDGET = """
local every, span = tonumber(ARGV[2]), tonumber(ARGV[3])
local function full_at(key)
  local value = tonumber(redis.call('GET', key))
  if not value or value < now then return now end
  return value
end
local function set_full_at(key, value)
  local ttl = value - now
  if ttl <= 0 then
    redis.call('DEL', key)
  else
    redis.call('SET', key, string.format('%.3f', value), 'PX', string.format('%.0f', ttl + 1000))
  end
end
"""

# KEYS: the address's failure key, its budget key. ARGV: now, ms per
# registration, span. Returns the wait in ms while the address is blocked,
# minus the wait while its budget is spent, or 0 when one was spent.
REGISTER_SPEND_LUA = (
    _LOGIN_CLOCK
    + _BUDGET
    + """
local wait = wait_of({KEYS[1]})
if wait > 0 then return wait end
local after = full_at(KEYS[2]) + every
local excess = after - now - span
if excess > 0 then return -math.max(1, math.ceil(excess)) end
set_full_at(KEYS[2], after)
return 0
"""
)

# KEYS: the address's budget key. ARGV: now, ms per registration, span.
# Gives one registration back; returns 0.
REGISTER_RETURN_LUA = (
    _LOGIN_CLOCK
    + _BUDGET
    + """
set_full_at(KEYS[1], full_at(KEYS[1]) - every)
return 0
"""
)

_SCRIPTS = {
    "login_admit": LOGIN_ADMIT_LUA,
    "login_fail": LOGIN_FAIL_LUA,
    "login_ok": LOGIN_OK_LUA,
    "login_release": LOGIN_RELEASE_LUA,
    "register_spend": REGISTER_SPEND_LUA,
    "register_return": REGISTER_RETURN_LUA,
}


class RedisLink(Protocol):
    """The Redis connection the throttle uses (:class:`~tornado_chat.redis_broker.RedisBroker`)."""

    @property
    def client(self) -> aioredis.Redis | None:
        """The command connection; None while there is none."""

    @property
    def connected(self) -> bool:
        """False while the link knows Redis is unreachable (no command is tried)."""

    @property
    def options(self) -> RedisOptions:
        """Key prefix and the URL to name in log lines."""


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else f"{type(exc).__name__}"


def _digest(key: str) -> str:
    # Usernames are the client's: hashed, no character of theirs reaches a
    # Redis key (no ':' or '*' games, no megabyte keys, no lone surrogate
    # that UTF-8 would refuse).
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


class RedisLoginThrottle:
    """:class:`~tornado_chat.auth.throttle.LoginThrottle`'s policy, shared by every node.

    Each operation is one Lua script (atomic in Redis) on the Redis clock, so
    nodes with skewed clocks agree and a restart forgets nothing. Keys expire
    by themselves once they can no longer block or count: Redis memory stays
    bounded by the failures of the last ``window``.

    When Redis does not answer within ``timeout`` (or the link knows it is
    disconnected), this node's in-memory throttle decides instead: fail-open
    to the per-process limit, not fail-closed, since refusing every login
    while Redis is down would let whoever can disturb Redis lock everyone out.
    That local throttle also counts every failure while Redis answers, so an
    outage does not hand out a fresh budget. One warning is logged per outage.

    Args:
        link: the Redis connection and key prefix to use (the server passes
            its broker, started later: nothing is sent before a login).
        clock: seconds; ``None`` (the server's choice) uses Redis's ``TIME``.
            Tests pass a fake clock; every node of a deployment must agree.
        max_failures, user_max_failures, base_delay, max_delay, window,
            register_burst, register_per_hour: as for LoginThrottle.
        timeout: seconds a login waits for Redis before deciding locally.
    """

    def __init__(
        self,
        link: RedisLink,
        *,
        clock: Callable[[], float] | None = None,
        max_failures: int = MAX_FAILURES,
        user_max_failures: int = USER_MAX_FAILURES,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        window: float = 900.0,
        register_burst: int = REGISTER_BURST,
        register_per_hour: int = REGISTER_PER_HOUR,
        timeout: float = LOGIN_THROTTLE_TIMEOUT,
    ) -> None:
        self._link = link
        self._scripts: tuple[aioredis.Redis, dict[str, AsyncScript]] | None = None
        self._clock = clock
        self._timeout = timeout
        self._policy = [_ms(base_delay), _ms(max_delay), _ms(window)]
        self._max_failures = max(1, max_failures)
        self._user_max_failures = max(1, user_max_failures)
        burst, per_hour = max(1, register_burst), max(1, register_per_hour)
        every = 3_600_000 / per_hour
        self._budget = [every, burst * every]
        self.local = LoginThrottle(
            max_failures=max_failures,
            user_max_failures=user_max_failures,
            base_delay=base_delay,
            max_delay=max_delay,
            window=window,
            register_burst=burst,
            register_per_hour=per_hour,
            clock=time.monotonic if clock is None else clock,
        )
        prefix = link.options.prefix
        self._user_prefix = f"{prefix}:login:user:"
        self._pair_prefix = f"{prefix}:login:pair:"
        self._address_prefix = f"{prefix}:login:addr:"
        self._budget_prefix = f"{prefix}:register:addr:"
        self._down = False

    def user_key(self, username: str) -> str:
        """The Redis key counting ``username``'s failures."""
        return self._user_prefix + _digest(throttle_user_key(username))

    def pair_key(self, username: str, address: str) -> str:
        """The Redis key counting ``username``'s failures from ``address``."""
        return self._pair_prefix + _digest(throttle_pair_key(username, address))

    def address_key(self, address: str) -> str:
        """The Redis key counting the failures of ``address`` (grouped as in LoginThrottle)."""
        return self._address_prefix + _digest(throttle_address_key(address))

    def budget_key(self, address: str) -> str:
        """The Redis key holding the registration budget of ``address`` (grouped likewise)."""
        return self._budget_prefix + _digest(throttle_address_key(address))

    def _script(self, client: aioredis.Redis, name: str) -> AsyncScript:
        """The named script bound to ``client`` (redis-py loads it on first use)."""
        if self._scripts is None or self._scripts[0] is not client:
            # A new connection after the broker restarted: bind the scripts to it.
            self._scripts = (client, {n: client.register_script(s) for n, s in _SCRIPTS.items()})
        return self._scripts[1][name]

    async def _run(self, script: str, keys: list[str], args: Sequence[Any]) -> float | None:
        """Run one throttle script: the wait in seconds, or None when Redis did not answer."""
        now = "" if self._clock is None else str(_ms(self._clock()))
        link = self._link
        try:
            client = link.client
            if client is None or not link.connected:
                raise ConnectionError("the broker is reconnecting")
            run = self._script(client, script)
            reply = await asyncio.wait_for(run(keys, [now, *args]), self._timeout)
            wait_ms = int(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: this process decides
            if not self._down:
                self._down = True
                log.warning(
                    "login throttle: Redis at %s did not answer (%s); failed logins "
                    "are counted by this process alone until it does",
                    link.options.display,
                    _describe(exc) if str(exc) else f"no answer within {self._timeout:g} s",
                )
            return None
        if self._down:
            self._down = False
            log.info("login throttle: Redis answers again; failed logins are shared again")
        return wait_ms / 1000

    def _keys(self, username: str, address: str) -> list[str]:
        return [
            self.user_key(username),
            self.pair_key(username, address),
            self.address_key(address),
        ]

    async def before_login(self, username: str, address: str) -> None:
        """Admit a password check on every node, reserving a failure of the name and the pair."""
        args = [self._policy[0], self._policy[2], self._user_max_failures, self._max_failures]
        wait = await self._run("login_admit", self._keys(username, address), args)
        if wait is None:
            self.local.admit(username, address)
        elif wait > 0:
            raise refuse_login(wait)

    async def login_failed(self, username: str, address: str) -> None:
        """Settle as a failure: refuse if blocked by now; otherwise count it, for every node."""
        thresholds = [self._user_max_failures, self._max_failures, self._max_failures]
        args = ["1", 2, *self._policy, *thresholds]
        wait = await self._run("login_fail", self._keys(username, address), args)
        self.local.release(username, address)
        self._refuse(wait, username, address)
        self.local.failure(username, address)

    async def login_succeeded(self, username: str, address: str) -> None:
        """Settle as a success: refuse if blocked by now; otherwise forget the name's and pair's."""
        wait = await self._run("login_ok", self._keys(username, address), ())
        self.local.release(username, address)
        self._refuse(wait, username, address)
        self.local.success(username, address)

    async def login_abandoned(self, username: str, address: str) -> None:
        """Settle a check that never finished: release the reservation only."""
        await self._run("login_release", self._keys(username, address)[:2], ())
        self.local.release(username, address)

    def _refuse(self, wait: float | None, username: str, address: str) -> None:
        """Refuse if Redis said wait; when it did not answer, this node's own throttle decides."""
        if wait is None:
            self.local.check(username, address)
        elif wait > 0:
            raise refuse_login(wait)

    async def before_register(self, address: str) -> None:
        """Refuse while the address is blocked or its budget is spent (any node); else spend one."""
        keys = [self.address_key(address), self.budget_key(address)]
        wait = await self._run("register_spend", keys, self._budget)
        if wait is None:
            self.local.check_address(address)
            self.local.spend_registration(address)
            return
        if wait > 0:
            raise refuse_registration(wait)
        if wait < 0:
            raise refuse_registration_budget(-wait)
        # Admitted by every node: counted here too, so an outage starts from it.
        self.local.spend_registration(address, enforce=False)

    async def register_abandoned(self, address: str) -> None:
        """Give back the registration spent by :meth:`before_register`, on every node."""
        await self._run("register_return", [self.budget_key(address)], self._budget)
        self.local.return_registration(address)

    async def register_failed(self, address: str) -> None:
        """Count a failure of the address alone, for every node."""
        await self._run(
            "login_fail", [self.address_key(address)], ["0", 0, *self._policy, self._max_failures]
        )
        self.local.address_failure(address)
