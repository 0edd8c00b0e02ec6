"""Which key-exchange group each kind of TLS 1.3 client gets, and at what cost in round trips.

A TLS 1.3 client sends a key share for one group (or a few) in its first
ClientHello. When the server wants none of them it answers with a
HelloRetryRequest naming the group it does want, and the client starts again:
one more round trip, and more CPU on both sides. So the groups the server
context accepts decide which clients pay that.

This script builds the server context tornado_chat really uses
(:func:`tornado_chat.tls.make_server_context`, with an ECDSA P-256 leaf from
the project's toolkit) and, for comparison, the one the public API offered
before ``SSLContext.set_groups`` (the same context restricted to P-256 by
``set_ecdh_curve``). Each is shaken hands with, in memory
(``SSLObject`` over ``MemoryBIO``), by three verifying clients:

- ``X25519 first``: OpenSSL's default client, whose first key share is X25519;
- ``P-256 only``, ``P-384 only`` and ``X448 only``: a client context limited
  to that group (X448 is outside Mozilla's intermediate list).

The server's flights are read off the wire as they pass: every ServerHello
whose random is the RFC 8446 HelloRetryRequest value counts as one retry, and
the key_share extension of the final ServerHello names the group agreed.

    python bench/tls_groups.py            # one table, for this interpreter
    for v in 3.10 3.11 3.12 3.13; do python$v bench/tls_groups.py; done

It needs only the package's TLS dependencies (cryptography, trustme) and the
checkout on ``PYTHONPATH``.
"""

from __future__ import annotations

import platform
import ssl
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tornado_chat.pki import ensure_server_certificate
from tornado_chat.tls import make_server_context

# RFC 8446 4.1.3: a HelloRetryRequest is a ServerHello with this random.
HELLO_RETRY_RANDOM = bytes.fromhex(
    "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c"
)
HANDSHAKE_RECORD = 22
SERVER_HELLO = 2
KEY_SHARE = 51
# IANA TLS Supported Groups registry.
GROUP_NAMES = {
    0x0017: "P-256",
    0x0018: "P-384",
    0x0019: "P-521",
    0x001D: "X25519",
    0x001E: "X448",
}


@dataclass
class Outcome:
    """What one handshake came to."""

    retries: int
    group: str
    error: str = ""


def handshake_messages(flight: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, body) of every plaintext handshake message in a flight of TLS records."""
    buffer = b""
    offset = 0
    while offset + 5 <= len(flight):
        kind, length = flight[offset], int.from_bytes(flight[offset + 3 : offset + 5], "big")
        if kind == HANDSHAKE_RECORD:
            buffer += flight[offset + 5 : offset + 5 + length]
        offset += 5 + length
    while len(buffer) >= 4:
        length = int.from_bytes(buffer[1:4], "big")
        yield buffer[0], buffer[4 : 4 + length]
        buffer = buffer[4 + length :]


def server_hello(body: bytes) -> tuple[bool, int | None]:
    """(is a HelloRetryRequest, the group of its key_share) for a ServerHello body."""
    retry = body[2:34] == HELLO_RETRY_RANDOM
    offset = 34
    offset += 1 + body[offset]  # legacy_session_id_echo
    offset += 2 + 1  # cipher_suite, legacy_compression_method
    end = offset + 2 + int.from_bytes(body[offset : offset + 2], "big")
    offset += 2
    group = None
    while offset + 4 <= end:
        kind = int.from_bytes(body[offset : offset + 2], "big")
        length = int.from_bytes(body[offset + 2 : offset + 4], "big")
        if kind == KEY_SHARE:
            group = int.from_bytes(body[offset + 4 : offset + 6], "big")
        offset += 4 + length
    return retry, group


def shake(server_context: ssl.SSLContext, client_context: ssl.SSLContext) -> Outcome:
    """One in-memory handshake; the retries it took and the group agreed."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    from_server, from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(to_server, from_server, server_side=True)
    client = client_context.wrap_bio(to_client, from_client, server_hostname="localhost")
    retries, group = 0, None
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, end in (("client", client), ("server", server)):
            if done[name]:
                continue
            try:
                end.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                return Outcome(retries, "-", exc.reason or str(exc))
        to_server.write(from_client.read())
        flight = from_server.read()
        for kind, body in handshake_messages(flight):
            if kind == SERVER_HELLO:
                retry, share = server_hello(body)
                retries += retry
                if not retry:
                    group = share
        to_client.write(flight)
        if all(done.values()):
            name = GROUP_NAMES.get(group, hex(group)) if group is not None else "?"
            return Outcome(retries, name)
    return Outcome(retries, "-", "no progress")


def clients(ca: Path) -> dict[str, Callable[[], ssl.SSLContext]]:
    """The verifying client contexts, by the key shares they send."""

    def limited(curve: str | None) -> Callable[[], ssl.SSLContext]:
        def make() -> ssl.SSLContext:
            context = ssl.create_default_context(cafile=str(ca))
            if curve is not None:
                context.set_ecdh_curve(curve)
            return context

        return make

    return {
        "X25519 first": limited(None),
        "P-256 only": limited("prime256v1"),
        "P-384 only": limited("secp384r1"),
        "X448 only": limited("X448"),
    }


def main() -> int:
    """Print one Markdown table for this interpreter."""
    with tempfile.TemporaryDirectory() as directory:
        issued = ensure_server_certificate(Path(directory), ["localhost", "127.0.0.1"])

        def shipped() -> ssl.SSLContext:
            return make_server_context(issued.cert_path, issued.key_path)

        def p256_only() -> ssl.SSLContext:
            context = shipped()
            context.set_ecdh_curve("prime256v1")
            return context

        servers = {"make_server_context": shipped, "same + set_ecdh_curve(P-256)": p256_only}
        print(
            f"Python {platform.python_version()}, {ssl.OPENSSL_VERSION}, "
            f"SSLContext.set_groups: {'yes' if hasattr(ssl.SSLContext, 'set_groups') else 'no'}"
        )
        print()
        print("| server context | client key shares | HelloRetryRequests | group | result |")
        print("|---|---|---|---|---|")
        for server_name, make_server in servers.items():
            for client_name, make_client in clients(issued.ca_cert_path).items():
                try:
                    client = make_client()
                except ssl.SSLError as exc:
                    # Python 3.10's set_ecdh_curve knows the NIST curves only.
                    print(f"| {server_name} | {client_name} | | | no such client here: {exc} |")
                    continue
                outcome = shake(make_server(), client)
                result = f"refused: {outcome.error}" if outcome.error else "verified"
                print(
                    f"| {server_name} | {client_name} | {outcome.retries} | "
                    f"{outcome.group} | {result} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
