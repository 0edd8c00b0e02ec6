"""Which names may be ordered from a public ACME CA.

A public CA validates a name by reaching it from the internet, so loopback
and private addresses, single-label names and the special-use domains of
RFC 6761 / RFC 6762 / RFC 2606 can never be issued: those belong to the local CA.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from tornado_chat.acme import AcmeError

#: Special-use and reserved suffixes (RFC 6761, RFC 6762 .local, RFC 2606, ICANN .internal).
RESERVED_SUFFIXES = (".test", ".local", ".internal", ".localhost", ".example", ".invalid")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
LOCAL_CA_HINT = "it belongs to the local CA (leave out --acme-domain for it)"


def normalize(name: str) -> str:
    """Lower-case ``name`` without a trailing dot."""
    return name.strip().lower().rstrip(".")


def refusal(name: str, test_suffixes: Sequence[str] = ()) -> str | None:
    """Why ``name`` cannot be ordered from a public ACME CA, or None when it can.

    Args:
        name: a DNS name as given to ``--acme-domain``.
        test_suffixes: suffixes admitted anyway (``--acme-test-names``, for a test CA).
    """
    host = normalize(name)
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    else:
        return f"{name!r} is an IP address, not a public name: {LOCAL_CA_HINT}"
    if any(host.endswith(suffix) or host == suffix[1:] for suffix in test_suffixes):
        return None
    if host.startswith("*."):
        return f"{name!r} is a wildcard, which needs DNS-01; HTTP-01 is the only challenge here"
    labels = host.split(".")
    if not host or not all(_LABEL.match(label) for label in labels):
        return f"{name!r} is not a valid DNS name"
    if host == "localhost" or any(
        host.endswith(suffix) or host == suffix[1:] for suffix in RESERVED_SUFFIXES
    ):
        return f"{name!r} is a reserved name no public CA issues for: {LOCAL_CA_HINT}"
    if len(labels) < 2:
        return f"{name!r} is a single-label name, not a public one: {LOCAL_CA_HINT}"
    if labels[-1].isdigit():
        return f"{name!r} has a numeric top-level label, not a public name"
    return None


def check_public(names: Iterable[str], test_suffixes: Sequence[str] = ()) -> tuple[str, ...]:
    """The names, normalized, once each.

    Raises:
        AcmeError: a name is not public (one line saying why).
    """
    checked: list[str] = []
    for name in names:
        reason = refusal(name, test_suffixes)
        if reason is not None:
            raise AcmeError(f"--acme-domain {reason}")
        host = normalize(name)
        if host not in checked:
            checked.append(host)
    return tuple(checked)


def is_lets_encrypt(directory: str) -> bool:
    """Whether ``directory`` is one of Let's Encrypt's (where test names are refused)."""
    host = (urlsplit(directory).hostname or "").lower()
    return host == "letsencrypt.org" or host.endswith(".letsencrypt.org")
