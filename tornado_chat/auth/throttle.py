"""The login throttle's interface, and its in-process implementation.

The throttle also holds registration's budget per client address (a token
bucket: ``register_burst`` at once, refilled at ``register_per_hour``), spent
before the password is hashed. :class:`LoginThrottle` keeps the failures and
the budgets in this process's memory; with a Redis broker,
:class:`~tornado_chat.auth.throttle_redis.RedisLoginThrottle` applies the
same policy to every node at once. The application factory picks one
(``tornado_chat.app.make_login_throttle``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tornado_chat.addresses import address_group
from tornado_chat.errors import TooManyRequests

__all__ = ["LoginThrottle", "Throttle"]


LOGIN_REFUSED = "too many failed login attempts; try again later"
REGISTER_REFUSED = "too many attempts; try again later"
REGISTER_BUDGET_SPENT = "too many accounts registered from this address; try again later"

# Registration budget per client address (the defaults of --register-burst and
# --register-per-hour; config.Settings repeats them and a test keeps the two
# equal). A classroom or an office behind one NAT address registers its 30-odd
# people in one go; a script gets 40 accounts and then 30 an hour, so the
# hundreds needed to fill a server take a day from one address.
REGISTER_BURST = 40
REGISTER_PER_HOUR = 30


def refuse_login(wait: float) -> TooManyRequests:
    """The 429 a blocked login gets, ``wait`` seconds before it may be tried again."""
    return TooManyRequests("too_many_attempts", LOGIN_REFUSED, retry_after=wait)


def refuse_registration(wait: float) -> TooManyRequests:
    """The 429 a blocked registration gets."""
    return TooManyRequests("too_many_attempts", REGISTER_REFUSED, retry_after=wait)


def refuse_registration_budget(wait: float) -> TooManyRequests:
    """The 429 a registration gets once its address has spent its budget."""
    return TooManyRequests("too_many_attempts", REGISTER_BUDGET_SPENT, retry_after=wait)


def throttle_user_key(username: str) -> str:
    """What the throttle counts a username as: lower-cased, at most 64 characters."""
    # Bounded: an attacker's megabyte "username" must not become a key.
    return username.lower()[:64]


def throttle_address_key(address: str) -> str:
    """What the throttle, the registration budget and the hash queue count an address as.

    :func:`tornado_chat.addresses.address_group` at IPv6 /64 (one host usually
    owns a whole /64; ``--ipv6-prefix`` applies to the socket caps only),
    cut to 64 characters for anything that is no address.
    """
    return address_group(address, 64)[:64]


# A username alone (counted from every address) is blocked only after this many
# failures: a stranger's few guesses must not lock the owner out, while a
# guessing campaign spread over many addresses still meets a limit. The
# (username, address) pair and the address are blocked after MAX_FAILURES.
MAX_FAILURES = 5
USER_MAX_FAILURES = 50
# A login reserves a failure of its name and of its (name, address) pair
# before the password is hashed; the reservation is settled when the check
# ends. One that is never settled (the process died mid-check) stops counting
# after this long, which no bounded hashing queue comes near.
PENDING_TTL = 60.0


def throttle_pair_key(username: str, address: str) -> str:
    """What the throttle counts one username tried from one address as."""
    # Unambiguous: the address comes first and the server only ever sees IP
    # addresses, whose keys hold no NUL; whatever follows the first NUL is the name.
    return throttle_address_key(address) + "\0" + throttle_user_key(username)


class Throttle(Protocol):
    """What :class:`AuthService` asks of a login throttle.

    Every method that may refuse raises :class:`TooManyRequests`
    (``too_many_attempts`` with ``retry_after``). :meth:`login_failed` and
    :meth:`login_succeeded` check and update in one step, so that concurrent
    guesses admitted together cannot all slip past the limit.
    """

    async def before_login(self, username: str, address: str) -> None:
        """Admit a password check, reserving a failure of the name and the pair.

        Refuses while the username, the pair or the address is blocked, or
        while the failures counted and reserved would reach the name's or the
        pair's limit: concurrent guesses are stopped before they are hashed.
        Every admitted login is settled by exactly one of the three calls below.
        """

    async def login_failed(self, username: str, address: str) -> None:
        """Settle as a failure: refuse if blocked by now; otherwise count one of the three keys."""

    async def login_succeeded(self, username: str, address: str) -> None:
        """Settle as a success: refuse if blocked by now; otherwise forget the name's and pair's."""

    async def login_abandoned(self, username: str, address: str) -> None:
        """Settle a check that never finished (an error): release the reservation only."""

    async def before_register(self, address: str) -> None:
        """Refuse while the address is blocked or its registration budget is spent; else spend one.

        Called before the password is hashed, so a burst of registrations
        from one address costs no more hashes than its budget.
        """

    async def register_failed(self, address: str) -> None:
        """Count a failure of the address alone (a taken name at registration)."""

    async def register_abandoned(self, address: str) -> None:
        """Give back the registration :meth:`before_register` spent (nothing was created)."""


@dataclass(slots=True)
class _Failures:
    count: int
    last: float
    blocked_until: float
    pending: int = 0  # reserved by password checks in progress
    pending_at: float = 0.0  # when ``pending`` last changed (see PENDING_TTL)


@dataclass(slots=True)
class _Budget:
    # When the address's budget is whole again: each registration pushes it
    # one interval later (from now at the earliest), and a registration is
    # refused while that would put it more than ``register_burst`` intervals
    # ahead (a token bucket kept as one time, which Redis stores as is).
    full_at: float


class LoginThrottle:
    """Failure backoff per (username, address), per address and per username, in memory.

    A key is blocked for ``base_delay`` seconds once it has failed its
    threshold of times within ``window`` seconds of each other, doubling with
    every further failure up to ``max_delay``; a quiet ``window`` forgets the
    failures. The keys and their thresholds:

    - a username tried from one address (:func:`throttle_pair_key`) and a
      client address (:func:`throttle_address_key`): ``max_failures``, so
      one address's guesses are stopped early;
    - a username from any address (:func:`throttle_user_key`):
      ``user_max_failures``, much higher, so a stranger's guesses do not lock
      the owner out on their own address, while guesses spread over many
      addresses still meet a limit (SECURITY.md states the trade-off).

    A login reserves a failure of its name and its pair before the password
    is hashed (see :meth:`admit`), so a burst of concurrent guesses gets no
    more hashes than the limit leaves; the reservation is settled when the
    check ends.

    Registration spends one of its address's ``register_burst`` tokens
    before hashing; they come back at ``register_per_hour`` (see
    :meth:`spend_registration`).

    Memory is bounded: stale entries are dropped as new ones arrive and at
    most ``max_entries`` keys of each kind are kept (oldest evicted first).

    With a Redis broker, :class:`~tornado_chat.auth.throttle_redis.RedisLoginThrottle`
    applies the same policy to every node at once (and falls back to this one
    when Redis does not answer).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_failures: int = MAX_FAILURES,
        user_max_failures: int = USER_MAX_FAILURES,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        window: float = 900.0,
        max_entries: int = 100_000,
        register_burst: int = REGISTER_BURST,
        register_per_hour: int = REGISTER_PER_HOUR,
    ) -> None:
        """Configure the policy (see the class docstring)."""
        self._clock = clock
        self._register_every = 3600.0 / max(1, register_per_hour)  # seconds per registration
        self._register_span = max(1, register_burst) * self._register_every
        self._max_failures = max(1, max_failures)
        self._user_max_failures = max(1, user_max_failures)
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._window = window
        self._max_entries = max_entries
        self._users: OrderedDict[str, _Failures] = OrderedDict()
        self._pairs: OrderedDict[str, _Failures] = OrderedDict()
        self._addresses: OrderedDict[str, _Failures] = OrderedDict()
        self._budgets: OrderedDict[str, _Budget] = OrderedDict()

    _user_key = staticmethod(throttle_user_key)
    _pair_key = staticmethod(throttle_pair_key)
    _address_key = staticmethod(throttle_address_key)

    def _wait(self, table: OrderedDict[str, _Failures], key: str, now: float) -> float:
        entry = table.get(key)
        return 0.0 if entry is None else max(0.0, entry.blocked_until - now)

    def _no_slot(
        self, table: OrderedDict[str, _Failures], key: str, now: float, threshold: int
    ) -> bool:
        """Whether the checks in progress already take every failure left before the limit.

        Past the limit (a block that has run out) one check at a time is
        left, as before reservations: its failure blocks again at once.
        """
        entry = table.get(key)
        if entry is None:
            return False
        counted = 0 if now - entry.last > self._window else entry.count
        return _pending(entry, now) >= max(1, threshold - counted)

    def admit(self, username: str, address: str) -> None:
        """Refuse like :meth:`check`, and while no failure is left to reserve; else reserve one.

        The failures left to reserve for a key are its threshold less those
        counted, at least one (see :meth:`_no_slot`).

        Raises:
            TooManyRequests: ``too_many_attempts`` with ``retry_after`` (the
                block's rest, or ``base_delay`` while reserved checks settle).
        """
        self.check(username, address)
        now = self._clock()
        user, pair = self._user_key(username), self._pair_key(username, address)
        if self._no_slot(self._users, user, now, self._user_max_failures) or self._no_slot(
            self._pairs, pair, now, self._max_failures
        ):
            raise refuse_login(self._base_delay)
        for table, key in ((self._users, user), (self._pairs, pair)):
            entry = table.get(key)
            if entry is None:
                entry = table[key] = _Failures(0, now, 0.0)
            entry.pending = _pending(entry, now) + 1
            entry.pending_at = now

    def release(self, username: str, address: str) -> None:
        """Give back one reservation of :meth:`admit` (the check it admitted ended)."""
        now = self._clock()
        user, pair = self._user_key(username), self._pair_key(username, address)
        for table, key in ((self._users, user), (self._pairs, pair)):
            entry = table.get(key)
            if entry is not None:
                entry.pending = max(0, _pending(entry, now) - 1)
                entry.pending_at = now

    def check(self, username: str, address: str) -> None:
        """Refuse an attempt while the username, the pair or the address is blocked.

        Raises:
            TooManyRequests: ``too_many_attempts`` with ``retry_after``.
        """
        now = self._clock()
        wait = max(
            self._wait(self._users, self._user_key(username), now),
            self._wait(self._pairs, self._pair_key(username, address), now),
            self._wait(self._addresses, self._address_key(address), now),
        )
        if wait > 0:
            raise refuse_login(wait)

    def check_address(self, address: str) -> None:
        """Like :meth:`check`, for the address alone (used by registration).

        Raises:
            TooManyRequests: ``too_many_attempts`` with ``retry_after``.
        """
        wait = self._wait(self._addresses, self._address_key(address), self._clock())
        if wait > 0:
            raise refuse_registration(wait)

    def spend_registration(self, address: str, *, enforce: bool = True) -> None:
        """Spend one registration of the address's budget (grouped as :func:`throttle_address_key`).

        Args:
            address: the client's address.
            enforce: False counts the registration even with no budget left
                (the shared throttle already admitted it; this copy only has
                to be current when Redis stops answering).

        Raises:
            TooManyRequests: ``too_many_attempts`` while the budget is spent,
                with ``retry_after`` until one registration is back.
        """
        now = self._clock()
        key = self._address_key(address)
        budget = self._budgets.get(key)
        full_at = max(now, budget.full_at if budget is not None else now) + self._register_every
        excess = full_at - now - self._register_span
        if excess > 0 and enforce:
            raise refuse_registration_budget(excess)
        if budget is None:
            self._budgets[key] = _Budget(min(full_at, now + self._register_span))
        else:
            budget.full_at = min(full_at, now + self._register_span)
            self._budgets.move_to_end(key)  # ordered by last change
        while self._budgets:
            oldest = next(iter(self._budgets.values()))
            if oldest.full_at > now and len(self._budgets) <= self._max_entries:
                break
            self._budgets.popitem(last=False)

    def return_registration(self, address: str) -> None:
        """Give one registration back to the address's budget (it created nothing)."""
        budget = self._budgets.get(self._address_key(address))
        if budget is not None:
            budget.full_at = max(self._clock(), budget.full_at - self._register_every)

    def address_failure(self, address: str) -> None:
        """Count a failure against the address alone (used by registration)."""
        self._record(self._addresses, self._address_key(address), self._clock(), self._max_failures)

    def failure(self, username: str, address: str) -> None:
        """Count a failed attempt against the username, the pair and the address."""
        now = self._clock()
        self._record(self._users, self._user_key(username), now, self._user_max_failures)
        self._record(self._pairs, self._pair_key(username, address), now, self._max_failures)
        self._record(self._addresses, self._address_key(address), now, self._max_failures)

    def success(self, username: str, address: str) -> None:
        """Forget the username's failures and the pair's (not their reservations).

        The address keeps its count: otherwise an attacker could log in to
        an account of their own between guesses to reset it.
        """
        now = self._clock()
        user, pair = self._user_key(username), self._pair_key(username, address)
        for table, key in ((self._users, user), (self._pairs, pair)):
            entry = table.get(key)
            if entry is None:
                continue
            if _pending(entry, now):
                entry.count, entry.blocked_until = 0, 0.0
            else:
                del table[key]

    # The Throttle protocol: no await inside, so each check-and-update is atomic.

    async def before_login(self, username: str, address: str) -> None:
        """:meth:`admit`."""
        self.admit(username, address)

    async def login_failed(self, username: str, address: str) -> None:
        """:meth:`release`, :meth:`check`, then :meth:`failure`."""
        self.release(username, address)
        self.check(username, address)
        self.failure(username, address)

    async def login_succeeded(self, username: str, address: str) -> None:
        """:meth:`release`, :meth:`check`, then :meth:`success`."""
        self.release(username, address)
        self.check(username, address)
        self.success(username, address)

    async def login_abandoned(self, username: str, address: str) -> None:
        """:meth:`release`."""
        self.release(username, address)

    async def before_register(self, address: str) -> None:
        """:meth:`check_address`, then :meth:`spend_registration`."""
        self.check_address(address)
        self.spend_registration(address)

    async def register_abandoned(self, address: str) -> None:
        """:meth:`return_registration`."""
        self.return_registration(address)

    async def register_failed(self, address: str) -> None:
        """:meth:`address_failure`."""
        self.address_failure(address)

    def _record(
        self, table: OrderedDict[str, _Failures], key: str, now: float, threshold: int
    ) -> None:
        entry = table.pop(key, None)
        if entry is None:
            entry = _Failures(0, now, 0.0)
        elif now - entry.last > self._window:
            entry.count, entry.blocked_until = 0, 0.0
        entry.count += 1
        entry.last = now
        excess = entry.count - threshold
        if excess >= 0:
            delay = min(self._max_delay, self._base_delay * 2.0 ** min(excess, 32))
            entry.blocked_until = max(entry.blocked_until, now + delay)
        table[key] = entry  # re-inserted last: the table stays ordered by `last`
        self._evict(table, now)

    def _evict(self, table: OrderedDict[str, _Failures], now: float) -> None:
        while table:
            oldest = next(iter(table.values()))
            stale = (
                now - oldest.last > self._window
                and oldest.blocked_until <= now
                and not _pending(oldest, now)
            )
            if not stale and len(table) <= self._max_entries:
                break
            table.popitem(last=False)


def _pending(entry: _Failures, now: float) -> int:
    """The reservations of an entry still in force (see PENDING_TTL)."""
    return entry.pending if now - entry.pending_at <= PENDING_TTL else 0
