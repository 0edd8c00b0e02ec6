"""The login throttle shared by every node through Redis (with ``--broker redis://...``).

Keys, under the broker's prefix: ``{prefix}:login:user:{sha256}``,
``{prefix}:login:pair:{sha256}`` and ``{prefix}:login:addr:{sha256}``
(hashes), failures of a username, of a username from one address, or of a
client address, keyed by the SHA-256 of what
:class:`~tornado_chat.auth.throttle.LoginThrottle` would count them as, each
expiring once it can no longer block or count. This module owns its Lua
scripts and runs them on the broker's command connection through redis-py's
script objects (``EVALSHA``, loading the script again after a Redis restart).
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
    USER_MAX_FAILURES,
    LoginThrottle,
    refuse_login,
    refuse_registration,
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
# n (failures in the current window), last (time of the latest failure) and
# until (blocked until). ARGV[1] is the time in ms, or '' for Redis's own
# clock (what the server uses: every node agrees with it).
_LOGIN_CLOCK = """
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[1])
end
local function wait_of(keys)
  local wait = 0
  for _, key in ipairs(keys) do
    local blocked = tonumber(redis.call('HGET', key, 'until'))
    if blocked and blocked - now > wait then wait = blocked - now end
  end
  return wait
end
"""

# KEYS: the keys to check. ARGV: now. Returns the wait in ms (0: admitted).
LOGIN_WAIT_LUA = _LOGIN_CLOCK + "return wait_of(KEYS)\n"

# KEYS: the keys to charge. ARGV: now, '1' to refuse (return the wait, count
# nothing) when a key is blocked already, base delay ms, max delay ms, window
# ms, then each key's threshold (failures before it blocks), in KEYS order.
# Returns the wait in ms, 0 when the failure was counted. Each key lives until
# it can neither block nor count (plus a second).
LOGIN_FAIL_LUA = (
    _LOGIN_CLOCK
    + """
if ARGV[2] == '1' then
  local wait = wait_of(KEYS)
  if wait > 0 then return wait end
end
local base, cap, window = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
for i, key in ipairs(KEYS) do
  local max_failures = tonumber(ARGV[5 + i])
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
  redis.call('HSET', key, 'n', n, 'last', string.format('%.0f', now),
             'until', string.format('%.0f', blocked))
  redis.call('PEXPIRE', key, string.format('%.0f', math.max(window, blocked - now) + 1000))
end
return 0
"""
)

# KEYS: user key, pair key, address key. ARGV: now. Refuses (returns the wait
# in ms) while any is blocked; otherwise forgets the user's and the pair's
# failures, never the address's (or one's own account would reset a guessing
# address).
LOGIN_OK_LUA = (
    _LOGIN_CLOCK
    + """
local wait = wait_of(KEYS)
if wait > 0 then return wait end
redis.call('DEL', KEYS[1], KEYS[2])
return 0
"""
)

_SCRIPTS = {
    "login_wait": LOGIN_WAIT_LUA,
    "login_fail": LOGIN_FAIL_LUA,
    "login_ok": LOGIN_OK_LUA,
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
        max_failures, user_max_failures, base_delay, max_delay, window: as for
            LoginThrottle.
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
        timeout: float = LOGIN_THROTTLE_TIMEOUT,
    ) -> None:
        self._link = link
        self._scripts: tuple[aioredis.Redis, dict[str, AsyncScript]] | None = None
        self._clock = clock
        self._timeout = timeout
        self._policy = [_ms(base_delay), _ms(max_delay), _ms(window)]
        self._max_failures = max(1, max_failures)
        self._user_max_failures = max(1, user_max_failures)
        self.local = LoginThrottle(
            max_failures=max_failures,
            user_max_failures=user_max_failures,
            base_delay=base_delay,
            max_delay=max_delay,
            window=window,
            clock=time.monotonic if clock is None else clock,
        )
        prefix = link.options.prefix
        self._user_prefix = f"{prefix}:login:user:"
        self._pair_prefix = f"{prefix}:login:pair:"
        self._address_prefix = f"{prefix}:login:addr:"
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

    async def before_login(self, username: str, address: str) -> None:
        """Refuse while the username, the pair or the address is blocked on any node."""
        await self._login_step("login_wait", username, address)

    async def login_failed(self, username: str, address: str) -> None:
        """Refuse if blocked by now; otherwise count a failure of the three keys, for every node."""
        thresholds = [self._user_max_failures, self._max_failures, self._max_failures]
        await self._login_step("login_fail", username, address, ["1", *self._policy, *thresholds])
        self.local.failure(username, address)

    async def login_succeeded(self, username: str, address: str) -> None:
        """Refuse if blocked by now; otherwise forget the username's and the pair's failures."""
        await self._login_step("login_ok", username, address)
        self.local.success(username, address)

    async def _login_step(
        self, script: str, username: str, address: str, args: Sequence[Any] = ()
    ) -> None:
        """Run a login script on the name's, the pair's and the address's keys.

        Refuses if the script says wait; when Redis does not answer, this
        node's own throttle decides.
        """
        keys = [self.user_key(username), self.pair_key(username, address)]
        wait = await self._run(script, [*keys, self.address_key(address)], args)
        if wait is None:
            self.local.check(username, address)
        elif wait > 0:
            raise refuse_login(wait)

    async def before_register(self, address: str) -> None:
        """Refuse while the address is blocked on any node."""
        wait = await self._run("login_wait", [self.address_key(address)], ())
        if wait is None:
            self.local.check_address(address)
        elif wait > 0:
            raise refuse_registration(wait)

    async def register_failed(self, address: str) -> None:
        """Count a failure of the address alone, for every node."""
        await self._run(
            "login_fail", [self.address_key(address)], ["0", *self._policy, self._max_failures]
        )
        self.local.address_failure(address)
