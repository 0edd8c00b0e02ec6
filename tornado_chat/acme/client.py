"""One ACME conversation, through certbot's ``acme`` package and ``josepy``.

Nothing here signs JWS by hand: the library does the protocol, this module
chooses HTTP-01, builds the CSR with ``cryptography`` and turns every failure
into one :class:`~tornado_chat.acme.AcmeError` line. The calls block (the
library uses ``requests``): the manager runs them in an executor.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tornado_chat.acme import AcmeError

RATE_LIMITED = "urn:ietf:params:acme:error:rateLimited"
#: How long one order may take from new-order to the downloaded chain.
ORDER_TIMEOUT = 90.0
NETWORK_TIMEOUT = 30

Publish = Callable[[str, str], None]
Withdraw = Callable[[str], None]


def new_account_key() -> bytes:
    """A fresh RSA-2048 account key in PEM (RS256 is the algorithm every ACME CA takes)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _pem(key)


def new_certificate_key() -> bytes:
    """A fresh ECDSA P-256 certificate key in PEM, the local CA's default key type too."""
    return _pem(ec.generate_private_key(ec.SECP256R1()))


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_csr(key_pem: bytes, domains: Sequence[str]) -> bytes:
    """A PEM CSR for ``domains`` (all in subjectAltName; the first is the CN too)."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise AcmeError("the certificate key is neither RSA nor ECDSA")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domains[0])]))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name) for name in domains]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def retry_after_seconds(value: str | None, now: datetime.datetime | None = None) -> int | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return max(0, int((when - now).total_seconds()))


def wait_text(seconds: int) -> str:
    """``2h 5m`` / ``40s``: a wait a person can read."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def describe(problem_type: str | None, detail: str, retry_after: int | None) -> str:
    """One line for an ACME problem document (RFC 8555 section 6.7)."""
    detail = " ".join(str(detail).split()) or "no detail"
    if problem_type == RATE_LIMITED:
        wait = f"; try again in {wait_text(retry_after)}" if retry_after is not None else ""
        return f"the ACME CA rate-limited this request: {detail}{wait}"
    kind = (problem_type or "").rsplit(":", 1)[-1] or "error"
    return f"the ACME CA refused ({kind}): {detail}"


@dataclass
class _LastResponse:
    """The Retry-After of the newest response, kept by a ``requests`` response hook."""

    retry_after: str | None = None

    def hook(self, response: Any, *args: object, **kwargs: object) -> Any:
        self.retry_after = response.headers.get("Retry-After")
        return response


@contextlib.contextmanager
def _one_line(directory: str, last: _LastResponse) -> Iterator[None]:
    """Turn the library's and the network's failures into one AcmeError line."""
    import requests
    from acme import errors, messages

    try:
        yield
    except AcmeError:
        raise
    except messages.Error as exc:
        seconds = retry_after_seconds(last.retry_after)
        raise AcmeError(describe(exc.typ, exc.detail or str(exc), seconds)) from None
    except errors.ValidationError as exc:
        reasons = [
            f"{authzr.body.identifier.value}: {challb.error.detail if challb.error else 'invalid'}"
            for authzr in exc.failed_authzrs
            for challb in authzr.body.challenges
            if challb.error is not None
        ]
        raise AcmeError(
            "the ACME CA could not validate HTTP-01 ("
            + ("; ".join(reasons) or "no reason given")
            + "): port 80 of every --acme-domain must reach --redirect-port"
        ) from None
    except errors.TimeoutError:
        raise AcmeError(f"the ACME order did not complete within {ORDER_TIMEOUT:.0f}s") from None
    except requests.exceptions.SSLError as exc:
        # requests calls every TLS failure an SSLError; only a certificate check
        # is about trust. A connection the CA's side drops mid-handshake (an
        # ACME server going away) is an outage, reported as one.
        refusal = next(
            (e for e in _causes(exc) if isinstance(e, ssl.SSLCertVerificationError)), None
        )
        if refusal is None:
            raise AcmeError(
                f"the ACME directory {directory} is unreachable: {_root_reason(exc)}"
            ) from None
        raise AcmeError(
            f"the ACME directory {directory} failed TLS verification "
            f"({refusal.verify_message or _first_line(refusal)}); "
            "a test CA needs --acme-ca-bundle"
        ) from None
    except (requests.exceptions.RequestException, errors.ClientError, ValueError) as exc:
        raise AcmeError(
            f"the ACME directory {directory} is unreachable: {_root_reason(exc)}"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _root_reason(exc: BaseException) -> str:
    """The operating system's reason under a requests error ("Connection refused").

    requests wraps urllib3's retry error, which wraps the connection error, whose
    message repeats the whole URL and pool; the reader needs the bottom line.
    """
    for item in _causes(exc):
        if isinstance(item, OSError) and item.strerror:
            return item.strerror
    return _first_line(exc)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps: in its args, urllib3's ``reason``, its cause."""
    seen: set[int] = set()
    pending: list[object] = [exc]
    while pending:
        item = pending.pop(0)
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        pending.extend(item.args)
        pending.extend((getattr(item, "reason", None), item.__cause__, item.__context__))


class AcmeClient:
    """An ACME account at one directory.

    Args:
        directory: the directory URL.
        account_key_pem: the account's private key (PEM, RSA).
        email: the contact address registered with the account ("" for none).
        ca_bundle: a PEM bundle to verify the directory's TLS with (a test
            CA); None uses the system's trust store.
    """

    def __init__(
        self, directory: str, account_key_pem: bytes, email: str, ca_bundle: Path | None = None
    ) -> None:
        from acme import client
        from josepy.jwk import JWKRSA

        self.directory_url = directory
        self.email = email
        key = serialization.load_pem_private_key(account_key_pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise AcmeError("the ACME account key is not an RSA key")
        self._key = JWKRSA(key=key)
        self._last = _LastResponse()
        self._net = client.ClientNetwork(
            self._key, user_agent="tornado_chat", timeout=NETWORK_TIMEOUT
        )
        if ca_bundle is not None:
            # requests' verify takes a CA bundle path too, and ClientNetwork
            # hands verify_ssl to every request as it is.
            self._net.verify_ssl = str(ca_bundle)  # type: ignore[assignment]
        self._net.session.hooks["response"].append(self._last.hook)
        self._client: client.ClientV2 | None = None

    def _connect(self) -> Any:
        """The directory and the account (registered on first use, found again after)."""
        from acme import client, errors, messages

        if self._client is not None:
            return self._client
        with _one_line(self.directory_url, self._last):
            directory = client.ClientV2.get_directory(self.directory_url, self._net)
            acme = client.ClientV2(directory, self._net)
            registration = messages.NewRegistration.from_data(
                email=self.email or None, terms_of_service_agreed=True
            )
            try:
                self._net.account = acme.new_account(registration)
            except errors.ConflictError as exc:
                # The key has an account already: RFC 8555 7.3.1 answers with its URL.
                self._net.account = messages.RegistrationResource(
                    uri=exc.location, body=messages.Registration()
                )
        self._client = acme
        return acme

    def offers_renewal_info(self) -> bool:
        """Whether the directory has ARI (``renewalInfo``, RFC 9773)."""
        acme = self._connect()
        try:
            acme.directory["renewalInfo"]
        except KeyError:
            return False
        return True

    def renewal_time(self, chain_pem: bytes) -> datetime.datetime | None:
        """The CA's suggested renewal time for a certificate (ARI), or None without ARI."""
        acme = self._connect()
        with _one_line(self.directory_url, self._last):
            when, _next_check = acme.renewal_time(chain_pem)
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        result: datetime.datetime = when
        return result

    def order(
        self,
        domains: Sequence[str],
        key_pem: bytes,
        publish: Publish,
        withdraw: Withdraw,
        on_order: Callable[[], None] | None = None,
    ) -> bytes:
        """Order a certificate for ``domains`` with HTTP-01 and return the PEM chain.

        Args:
            domains: the names (already checked by :mod:`tornado_chat.acme.names`).
            key_pem: the certificate's private key; the CSR is made with it.
            publish: ``publish(token, key_authorization)`` makes the answer
                reachable at ``/.well-known/acme-challenge/<token>``.
            withdraw: ``withdraw(token)`` once the order is done.
            on_order: called once the new order is placed (tests count orders).

        Raises:
            AcmeError: one line: refused, rate-limited, unreachable, invalid challenge.
        """
        from acme import challenges

        acme = self._connect()
        tokens: list[str] = []
        try:
            with _one_line(self.directory_url, self._last):
                order = acme.new_order(make_csr(key_pem, domains))
                if on_order is not None:
                    on_order()
                for authzr in order.authorizations:
                    if authzr.body.status.name == "valid":
                        continue  # the CA reused an earlier authorization
                    offered = authzr.body.challenges
                    http01 = (c for c in offered if isinstance(c.chall, challenges.HTTP01))
                    challb = next(http01, None)
                    if challb is None:
                        raise AcmeError(
                            f"the ACME CA offers no HTTP-01 challenge for "
                            f"{authzr.body.identifier.value}"
                        )
                    response, validation = challb.response_and_validation(self._key)
                    token = challb.chall.encode("token")
                    publish(token, validation)
                    tokens.append(token)
                    acme.answer_challenge(challb, response)
                deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
                finished = acme.poll_and_finalize(order, deadline)
                chain: str = finished.fullchain_pem
        finally:
            for token in tokens:
                withdraw(token)
        return chain.encode()
