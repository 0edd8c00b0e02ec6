"""trustme's API on top of the persistent local CA.

:meth:`tornado_chat.pki.LocalCA.to_trustme` returns a :class:`TrustmeCA`: a
:class:`trustme.CA` that signs with the local CA's key, so tests and scripts
can issue throwaway in-memory leaves (``issue_cert``), trust the CA
(``configure_trust``) and serve a leaf (``LeafCert.configure_cert``) — and
every client that already trusts ``certs/ca.pem`` accepts those leaves.

trustme issues whatever names it is asked for, but clients enforce the local
CA's name constraints, so :meth:`TrustmeCA.issue_cert` refuses names outside
them (the same rules as ``mkcerts server`` and ``sign``) instead of handing
back a certificate every client would reject. Leaves default to the toolkit's
365-day validity (trustme's own default runs to the year 3000), capped at the
CA's expiry, and carry subjectAltName and extendedKeyUsage non-critical as
the Web PKI rules require (trustme marks them critical), so ``mkcerts
verify`` accepts them too.
"""

from __future__ import annotations

import datetime
from typing import cast

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tornado_chat.errors import PKIError
from tornado_chat.pki.keys import PrivateKey, signature_hash
from tornado_chat.pki.names import (
    common_name_hosts,
    is_permitted,
    name_text,
    subject_alt_names,
)

#: Validity of a leaf issued without ``not_after`` (the toolkit's default).
DEFAULT_LEAF_DAYS = 365
#: Leaves start this long in the past, like the toolkit's own.
BACKDATE = datetime.timedelta(hours=1)


class TrustmeCA(trustme.CA):
    """A :class:`trustme.CA` backed by a local CA, held to its name constraints.

    Build it with :meth:`from_local` (or ``LocalCA.to_trustme()``).
    """

    _constraints: x509.NameConstraints | None = None
    _signing_key: PrivateKey

    @classmethod
    def from_local(cls, certificate: x509.Certificate, key: PrivateKey) -> TrustmeCA:
        """Wrap a CA certificate and its private key.

        Args:
            certificate: the local CA certificate.
            key: its private key.
        """
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # trustme's from_pem builds an instance of cls; its annotation says CA.
        ca = cast(
            TrustmeCA, cls.from_pem(certificate.public_bytes(serialization.Encoding.PEM), key_pem)
        )
        ca._signing_key = key
        try:
            ca._constraints = certificate.extensions.get_extension_for_class(
                x509.NameConstraints
            ).value
        except x509.ExtensionNotFound:
            ca._constraints = None
        return ca

    @property
    def certificate(self) -> x509.Certificate:
        """The CA certificate (the local CA's)."""
        return self._certificate

    def create_child_ca(self, key_type: trustme.KeyType = trustme.KeyType.ECDSA) -> trustme.CA:
        """Refused: the local CA has path length 0, so clients reject any child CA.

        Raises:
            PKIError: always.
        """
        raise PKIError(
            "the local CA has path length 0: a child CA would be rejected by every client"
        )

    def issue_cert(
        self,
        *identities: str,
        common_name: str | None = None,
        organization_name: str | None = None,
        organization_unit_name: str | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        key_type: trustme.KeyType = trustme.KeyType.ECDSA,
    ) -> trustme.LeafCert:
        """Issue an in-memory leaf, as :meth:`trustme.CA.issue_cert` does.

        The arguments are trustme's; ``not_before`` defaults to an hour ago
        and ``not_after`` to 365 days later, never past the CA's expiry.

        Raises:
            PKIError: an identity (or a host-like common name on a leaf
                without DNS names) is outside the CA's name constraints.
        """
        now = datetime.datetime.now(datetime.timezone.utc)
        if not_before is None:
            not_before = now - BACKDATE
        if not_after is None:
            not_after = min(
                not_before + datetime.timedelta(days=DEFAULT_LEAF_DAYS),
                self._certificate.not_valid_after_utc,
            )
        leaf = super().issue_cert(
            *identities,
            common_name=common_name,
            organization_name=organization_name,
            organization_unit_name=organization_unit_name,
            not_before=not_before,
            not_after=not_after,
            key_type=key_type,
        )
        # Check the certificate trustme built rather than re-parsing the
        # identities: what is checked is exactly what clients will see.
        built = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
        self._check(built)
        certificate = self._web_pki(built)
        return trustme.LeafCert(
            leaf.private_key_pem.bytes(),
            certificate.public_bytes(serialization.Encoding.PEM),
            [],
        )

    def _web_pki(self, built: x509.Certificate) -> x509.Certificate:
        """Re-sign trustme's leaf with subjectAltName and extendedKeyUsage non-critical.

        trustme marks both critical; the CA/Browser Forum rules (and
        cryptography's verifier, which ``mkcerts verify`` uses) require them
        non-critical when the subject is not empty, and trustme's subject
        never is. Everything else, serial number included, is kept.
        """
        relaxed = (x509.SubjectAlternativeName, x509.ExtendedKeyUsage)
        extensions = [
            x509.Extension(
                ext.oid, False if isinstance(ext.value, relaxed) else ext.critical, ext.value
            )
            for ext in built.extensions
        ]
        builder = x509.CertificateBuilder(
            issuer_name=built.issuer,
            subject_name=built.subject,
            public_key=built.public_key(),
            serial_number=built.serial_number,
            not_valid_before=built.not_valid_before_utc,
            not_valid_after=built.not_valid_after_utc,
            extensions=extensions,
        )
        return builder.sign(self._signing_key, signature_hash(self._signing_key))

    def _check(self, certificate: x509.Certificate) -> None:
        if self._constraints is None:
            return
        names = subject_alt_names(certificate)
        outside = [name_text(name) for name in names if not is_permitted(name, self._constraints)]
        if not any(isinstance(name, x509.DNSName) for name in names):
            # OpenSSL holds a host-like commonName to the constraints then.
            outside += [
                f"common name {host.value}"
                for host in common_name_hosts(certificate.subject)
                if not is_permitted(host, self._constraints)
            ]
        if outside:
            permitted = ", ".join(
                name_text(name) for name in self._constraints.permitted_subtrees or ()
            )
            raise PKIError(
                f"{', '.join(outside)} {'is' if len(outside) == 1 else 'are'} outside the names"
                f" this CA may sign ({permitted}); clients would reject the certificate"
            )
