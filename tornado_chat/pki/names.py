"""Names a certificate can be issued for, and the CA's name constraints.

A server name is a DNS name (``localhost``, ``chat.test``), a wildcard
(``*.chat.test``) or an IP address (``127.0.0.1``, ``::1``). Name constraints
follow RFC 5280 section 4.2.1.10: a DNS subtree ``test`` permits ``test`` and
every name made by adding labels on its left (``chat.test``, ``a.b.test``).

The issue's notation ``.test`` ("everything under test") is therefore written
``test`` in the certificate. The leading-dot form is an OpenSSL and NSS
extension that other verifiers reject as malformed (cryptography's verifier
does), so :func:`parse_permitted` drops the dot and every constraint the
toolkit writes is in the portable form.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import TypeAlias

from cryptography import x509
from cryptography.x509.oid import NameOID

from tornado_chat.errors import PKIError

SubjectName: TypeAlias = x509.DNSName | x509.IPAddress
"""A name a server certificate can carry in its subjectAltName."""

#: What a new CA may sign by default: reserved and special-use DNS names that
#: no public site can own (RFC 6761, RFC 8375, ICANN's .internal), loopback
#: and the private address ranges (RFC 1918, RFC 4193). A leaked CA key
#: therefore cannot impersonate a real site.
DEFAULT_PERMITTED: tuple[str, ...] = (
    "localhost",
    "test",
    "internal",
    "home.arpa",
    "invalid",
    "example",
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "::1/128",
    "fc00::/7",
)

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def _dns_name(text: str, *, what: str) -> str:
    """Normalise a DNS name: lower case, IDNA A-labels, no trailing dot.

    Raises:
        PKIError: the text is not a valid DNS name.
    """
    name = text.strip().rstrip(".").lower()
    if not name:
        raise PKIError(f"empty {what}")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise PKIError(f"invalid {what} {text!r}: {exc}") from None
    if len(name) > 253:
        raise PKIError(f"invalid {what} {text!r}: longer than 253 characters")
    for label in name.split("."):
        if not _LABEL.match(label):
            raise PKIError(
                f"invalid {what} {text!r}: labels are 1-63 letters, digits or hyphens"
                " and do not start or end with a hyphen"
            )
    return name


def parse_name(text: str) -> SubjectName:
    """Parse one server name given by a person into a subjectAltName entry.

    Args:
        text: a DNS name, a wildcard such as ``*.chat.test``, or an IPv4 or
            IPv6 address (brackets around IPv6 are accepted).

    Returns:
        ``x509.DNSName`` (IDNA-encoded, lower case) or ``x509.IPAddress``.

    Raises:
        PKIError: the name is empty, malformed, an unspecified address such as
            ``0.0.0.0``, or a wildcard that no client would accept.
    """
    raw = text.strip()
    candidate = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        pass
    else:
        if address.is_unspecified:
            raise PKIError(
                f"{raw} is not an address clients connect to; name the host or address"
                " they use instead (for example localhost or 127.0.0.1)"
            )
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            raise PKIError(f"invalid address {raw!r}: a zone index cannot be certified")
        return x509.IPAddress(address)
    if raw.startswith("*."):
        rest = _dns_name(raw[2:], what="name")
        if "." not in rest:
            # Chromium refuses wildcards directly under a registry-like
            # suffix and OpenSSL wants two labels after the star.
            raise PKIError(
                f"wildcard {raw} covers a whole top-level name, which browsers and OpenSSL"
                f" reject; use a deeper one such as *.app.{rest}"
            )
        return x509.DNSName("*." + rest)
    if "*" in raw:
        raise PKIError(f"invalid name {raw!r}: a wildcard must be the whole left-most label")
    return x509.DNSName(_dns_name(raw, what="name"))


def parse_names(texts: Iterable[str]) -> list[SubjectName]:
    """Parse several names, dropping duplicates while keeping their order.

    Raises:
        PKIError: a name is invalid, or no name was given.
    """
    result: list[SubjectName] = []
    for text in texts:
        name = parse_name(text)
        if name not in result:
            result.append(name)
    if not result:
        raise PKIError("no names given; a server certificate needs at least one name")
    return result


def name_text(name: x509.GeneralName) -> str:
    """Render a general name the way a person would type it (``localhost``, ``::1``)."""
    if isinstance(name, x509.IPAddress):
        return str(name.value)
    if isinstance(name, (x509.DNSName, x509.RFC822Name, x509.UniformResourceIdentifier)):
        return name.value
    return str(name.value)


def parse_permitted(text: str) -> x509.DNSName | x509.IPAddress:
    """Parse one permitted subtree: a DNS domain or an IP network in CIDR form.

    ``.test`` and ``test`` mean the same (see the module docstring); a bare
    address means that one address (``/32`` or ``/128``).

    Raises:
        PKIError: the text is neither a valid domain nor a network.
    """
    raw = text.strip()
    try:
        network = ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        if "/" in raw or _looks_like_address(raw):
            raise PKIError(f"invalid permitted network {raw!r}: {exc}") from None
    else:
        return x509.IPAddress(network)
    if "*" in raw:
        raise PKIError(f"invalid permitted name {raw!r}: write the domain without a wildcard")
    return x509.DNSName(_dns_name(raw.lstrip("."), what="permitted name"))


def _looks_like_address(text: str) -> bool:
    return ":" in text or bool(re.fullmatch(r"[0-9.]+", text))


def build_name_constraints(permitted: Sequence[str]) -> x509.NameConstraints:
    """Build the NameConstraints extension that permits only ``permitted``.

    Raises:
        PKIError: a permitted entry is invalid or the list is empty.
    """
    subtrees: list[x509.GeneralName] = []
    for text in permitted:
        subtree = parse_permitted(text)
        if subtree not in subtrees:
            subtrees.append(subtree)
    if not subtrees:
        raise PKIError("name constraints need at least one permitted name")
    return x509.NameConstraints(permitted_subtrees=subtrees, excluded_subtrees=None)


def _dns_within(name: str, subtree: str) -> bool:
    # RFC 5280: add zero or more labels on the left of the constraint. A
    # wildcard name is within the subtree when every name it matches is.
    name = name.removeprefix("*.")
    return name == subtree or name.endswith("." + subtree)


def is_permitted(name: x509.GeneralName, constraints: x509.NameConstraints | None) -> bool:
    """Whether a certificate for ``name`` would satisfy the CA's name constraints.

    Mirrors RFC 5280: a constraint applies only to names of its own type, a
    permitted list of a type admits only names inside one of its subtrees, and
    excluded subtrees always win.

    Args:
        name: a DNS name or IP address from a subjectAltName.
        constraints: the CA's NameConstraints, or None for an unconstrained CA.
    """
    if constraints is None:
        return True
    if _matches_any(name, constraints.excluded_subtrees or ()):
        return False
    permitted = [
        subtree for subtree in constraints.permitted_subtrees or () if type(subtree) is type(name)
    ]
    if isinstance(name, x509.IPAddress):
        # Address families are separate name spaces: an IPv6 address is
        # constrained only when the CA lists IPv6 networks.
        permitted = [
            subtree
            for subtree in permitted
            if isinstance(subtree.value, (ipaddress.IPv4Network, ipaddress.IPv6Network))
            and subtree.value.version == name.value.version
        ]
    return not permitted or _matches_any(name, permitted)


def _matches_any(name: x509.GeneralName, subtrees: Iterable[x509.GeneralName]) -> bool:
    for subtree in subtrees:
        if isinstance(name, x509.DNSName) and isinstance(subtree, x509.DNSName):
            if _dns_within(name.value.lower(), subtree.value.lower().lstrip(".")):
                return True
        elif isinstance(name, x509.IPAddress) and isinstance(subtree, x509.IPAddress):
            network = subtree.value
            address = name.value
            if (
                isinstance(network, (ipaddress.IPv4Network, ipaddress.IPv6Network))
                and isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address))
                and address.version == network.version
                and address in network
            ):
                return True
    return False


def covers(san: Iterable[x509.GeneralName], name: SubjectName) -> bool:
    """Whether a certificate with these subjectAltName entries is valid for ``name``.

    A wildcard entry covers exactly one extra label on its left, as TLS
    clients match it (RFC 6125 section 6.4.3).
    """
    for entry in san:
        if isinstance(name, x509.IPAddress) and isinstance(entry, x509.IPAddress):
            if entry.value == name.value:
                return True
        elif isinstance(name, x509.DNSName) and isinstance(entry, x509.DNSName):
            wanted = name.value.lower()
            have = entry.value.lower()
            if have == wanted:
                return True
            if have.startswith("*.") and not wanted.startswith("*."):
                head, _, tail = wanted.partition(".")
                if head and tail == have[2:]:
                    return True
    return False


def common_name_host(text: str) -> str | None:
    """The DNS name OpenSSL reads in a subject commonName, or None when it reads none.

    OpenSSL checks a commonName against a CA's DNS name constraints when it
    "looks like a host name": ASCII letters, digits, ``_``, ``-`` and ``.``,
    at least two labels, no ``-`` or ``.`` first or last and none next to a
    dot (``www.google.com``, ``my_host.test``; not ``alice`` or
    ``Alice Smith``). Names read this way are also what a legacy client might
    match a hostname against, so the toolkit refuses to sign one outside the
    constraints and ``verify`` reports it as OpenSSL does.

    Returns:
        The name in lower case, or None.
    """
    found = False
    last = len(text) - 1
    for index, char in enumerate(text):
        if char.isascii() and (char.isalnum() or char == "_"):
            continue
        if 0 < index < last:
            if char == "-":
                continue
            if char == "." and text[index + 1] not in ".-" and text[index - 1] != "-":
                found = True
                continue
        return None
    return text.lower() if found else None


def common_name_hosts(subject: x509.Name) -> list[x509.DNSName]:
    """Every commonName of ``subject`` that OpenSSL treats as a DNS name (see above)."""
    hosts: list[x509.DNSName] = []
    for attribute in subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attribute.value
        host = common_name_host(value) if isinstance(value, str) else None
        if host is not None:
            hosts.append(x509.DNSName(host))
    return hosts


def subject_alt_names(certificate: x509.Certificate) -> list[x509.GeneralName]:
    """The subjectAltName entries of a certificate (empty when it has none)."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(extension.value)


# -- hosts as clients see them -------------------------------------------------

#: Listen addresses that mean "every interface". No certificate can name them
#: (:func:`parse_name` refuses unspecified addresses), so clients on this
#: machine reach a server listening there as ``localhost``.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 - compared, not bound


def client_host(host: str) -> str:
    """The host a client connects to for a server listening on ``host``.

    Args:
        host: a listen address or host name (brackets around IPv6 accepted).

    Returns:
        ``localhost`` for the wildcard addresses, ``host`` without brackets otherwise.
    """
    host = host.strip("[]")
    return "localhost" if host in WILDCARD_HOSTS else host


def url_host(host: str) -> str:
    """``host`` as it appears in a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host else host


def covers_host(san: Iterable[x509.GeneralName], host: str) -> bool:
    """Whether a verifying client of ``host`` accepts a certificate with these entries.

    Args:
        san: the certificate's subjectAltName entries.
        host: a host name or IP address; the wildcard listen addresses mean
            ``localhost`` (see :func:`client_host`).

    Returns:
        True when a DNS entry matches as RFC 6125 says (see :func:`covers`) or
        an IP entry equals the address; False for a host that is no valid name.
    """
    try:
        wanted = parse_name(client_host(host))
    except PKIError:
        return False
    # A client connects to a host, never to a wildcard pattern.
    if isinstance(wanted, x509.DNSName) and wanted.value.startswith("*."):
        return False
    return covers(san, wanted)
