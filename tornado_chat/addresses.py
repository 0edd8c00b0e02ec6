"""What each client address holds open, without I/O.

One address must not be able to take the whole server: its open sockets and
its handshakes still being authenticated are counted here, per address group.
An IPv4 client is its own group; an IPv6 client is grouped by its prefix
(``--ipv6-prefix``, a /64 by default), because one site is handed a whole /64
and can pick a new address in it for each connection. Counts are per process,
like every other socket limit.
"""

from __future__ import annotations

import ipaddress

__all__ = ["AddressCounts", "address_group", "count_down", "count_up"]


def address_group(addr: str, ipv6_prefix: int = 64) -> str:
    """The group a client address is counted in.

    Args:
        addr: the client's address as Tornado gives it (``remote_ip``).
        ipv6_prefix: the prefix length IPv6 addresses are grouped by.

    Returns:
        The IPv4 address itself (also for an IPv4-mapped IPv6 one), the IPv6
        network ``2001:db8::/64``, or ``addr`` unchanged if it is no address
        (a Unix socket): then it is still counted, as one group.
    """
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)


class AddressCounts:
    """Open sockets and pending handshakes per address group.

    Every ``add_*`` is matched by one ``drop_*`` of the same group; a group
    whose counts reach zero is forgotten, so memory follows the addresses
    connected now.
    """

    __slots__ = ("_open", "_pending")

    def __init__(self) -> None:
        self._open: dict[str, int] = {}
        self._pending: dict[str, int] = {}

    def sockets(self, group: str) -> int:
        """Open (admitted) sockets of a group."""
        return self._open.get(group, 0)

    def pending(self, group: str) -> int:
        """Handshakes of a group that sent their upgrade and are not authenticated yet."""
        return self._pending.get(group, 0)

    def add_socket(self, group: str) -> None:
        """A socket of ``group`` was admitted."""
        count_up(self._open, group)

    def drop_socket(self, group: str) -> None:
        """An admitted socket of ``group`` closed."""
        count_down(self._open, group)

    def add_pending(self, group: str) -> None:
        """A handshake of ``group`` started authenticating."""
        count_up(self._pending, group)

    def drop_pending(self, group: str) -> None:
        """A handshake of ``group`` was admitted, refused or dropped."""
        count_down(self._pending, group)


def count_up(counts: dict[str, int], group: str) -> None:
    """One more of something for ``group``."""
    counts[group] = counts.get(group, 0) + 1


def count_down(counts: dict[str, int], group: str) -> None:
    """One less for ``group``; a group at zero is forgotten, so memory follows the addresses."""
    left = counts.get(group, 0) - 1
    if left > 0:
        counts[group] = left
    else:
        counts.pop(group, None)
