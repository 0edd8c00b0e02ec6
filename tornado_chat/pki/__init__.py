"""The local certificate authority toolkit.

Mint a CA once, trust it once, and from then on browsers, Python clients,
tests and other servers verify TLS for real::

    from tornado_chat.pki import LocalCA

    ca = LocalCA.load_or_create(Path("certs"))
    leaf = ca.issue_server(["localhost", "127.0.0.1", "::1"])
    alice = ca.issue_client("alice")          # PEM + PKCS#12, password returned once
    throwaway = ca.to_trustme().issue_cert("app.test")  # trustme.LeafCert, in memory

The server uses :func:`ensure_server_certificate`; people use the command line
(``tools/mkcerts``, ``mkcerts`` or ``python -m tornado_chat.pki``). Every
failure raises :class:`tornado_chat.errors.PKIError` with a one-line message.

Modules: :mod:`.ca` (the CA and issuing), :mod:`.names` (names and name
constraints), :mod:`.keys`, :mod:`.files` (file modes), :mod:`.verify`
(inspect and verify), :mod:`.truststore` with :mod:`.truststore_nss`,
:mod:`.truststore_system` and :mod:`.truststore_java`, :mod:`.provision`
(the server's certificate), :mod:`.trustme_ca` (trustme's API on the local
CA) and :mod:`.cli`.
"""

from __future__ import annotations

from tornado_chat.errors import PKIError
from tornado_chat.pki.ca import (
    APPLE_MAX_DAYS,
    CA_CERT_FILE,
    CA_KEY_FILE,
    CA_VALIDITY_DAYS,
    DEFAULT_DAYS,
    MOZILLA_MAX_DAYS,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    IssuedCertificate,
    LocalCA,
    load_certificate,
)
from tornado_chat.pki.files import CA_KEY_MODE, CERT_MODE, KEY_MODE
from tornado_chat.pki.keys import KEY_TYPES, KeyType
from tornado_chat.pki.names import DEFAULT_PERMITTED, is_permitted, parse_name
from tornado_chat.pki.provision import ServerCertificate, ensure_server_certificate, trust_hint
from tornado_chat.pki.trustme_ca import TrustmeCA
from tornado_chat.pki.truststore import (
    TrustAnchor,
    TrustState,
    TrustStatus,
    TrustStore,
    find_trust_stores,
)
from tornado_chat.pki.truststore_java import JavaTrustStore
from tornado_chat.pki.truststore_nss import NSSTrustStore
from tornado_chat.pki.truststore_system import SystemLayout, SystemTrustStore
from tornado_chat.pki.verify import (
    CertificateInfo,
    check_key_matches,
    describe_certificate,
    verify_certificate,
)

__all__ = [
    "APPLE_MAX_DAYS",
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CA_KEY_MODE",
    "CA_VALIDITY_DAYS",
    "CERT_MODE",
    "DEFAULT_DAYS",
    "DEFAULT_PERMITTED",
    "KEY_MODE",
    "KEY_TYPES",
    "MOZILLA_MAX_DAYS",
    "SERVER_CERT_FILE",
    "SERVER_KEY_FILE",
    "CertificateInfo",
    "IssuedCertificate",
    "JavaTrustStore",
    "KeyType",
    "LocalCA",
    "NSSTrustStore",
    "PKIError",
    "ServerCertificate",
    "SystemLayout",
    "SystemTrustStore",
    "TrustAnchor",
    "TrustState",
    "TrustStatus",
    "TrustStore",
    "TrustmeCA",
    "check_key_matches",
    "describe_certificate",
    "ensure_server_certificate",
    "find_trust_stores",
    "is_permitted",
    "load_certificate",
    "parse_name",
    "trust_hint",
    "verify_certificate",
]
