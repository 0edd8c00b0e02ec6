"""Private key generation, loading and description."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeAlias, get_args

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tornado_chat.errors import PKIError
from tornado_chat.pki.files import read_bytes

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
"""A key the toolkit can sign with or certify."""

PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
"""A public key the toolkit can certify."""

KeyType = Literal["ecdsa-p256", "rsa-2048", "rsa-3072"]
"""Key types on offer; ECDSA P-256 is the default everywhere."""

KEY_TYPES: tuple[str, ...] = get_args(KeyType)
CA_KEY_TYPES: tuple[str, ...] = ("ecdsa-p256", "rsa-3072")
DEFAULT_KEY_TYPE: KeyType = "ecdsa-p256"

# Curves and sizes clients accept in a chain (the CA/Browser Forum baseline
# requirements: P-256 and P-384, RSA of at least 2048 bits).
_CURVES: dict[str, str] = {"secp256r1": "P-256", "secp384r1": "P-384"}
_MIN_RSA_BITS = 2048


def generate_key(key_type: KeyType) -> PrivateKey:
    """Generate a new private key of ``key_type``.

    Raises:
        PKIError: the key type is unknown.
    """
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "rsa-3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise PKIError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")


def private_key_pem(key: PrivateKey) -> bytes:
    """PEM (PKCS#8, unencrypted; the file mode protects it) of a private key."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(path: Path, what: str = "key") -> PrivateKey:
    """Load an unencrypted PEM private key the toolkit can use.

    Raises:
        PKIError: unreadable, not a PEM key, encrypted, or of an unsupported type.
    """
    data = read_bytes(path, what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PKIError(f"failed to read {what} {path}: it is encrypted") from None
    except ValueError:
        raise PKIError(f"failed to read {what} {path}: not a PEM private key") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise PKIError(f"unsupported {what} {path}: only ECDSA and RSA keys are supported")
    check_public_key(key.public_key(), f"{what} {path}")
    return key


def check_public_key(key: object, what: str) -> PublicKey:
    """Check that ``key`` is one clients accept: ECDSA P-256/P-384 or RSA >= 2048.

    Raises:
        PKIError: any other algorithm, curve or size.
    """
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _CURVES:
            raise PKIError(f"unsupported {what}: curve {key.curve.name}; use P-256 or P-384")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise PKIError(f"unsupported {what}: RSA {key.key_size} is below 2048 bits")
        return key
    raise PKIError(f"unsupported {what}: {type(key).__name__}; use an ECDSA or RSA key")


def describe_key(key: object) -> str:
    """``ECDSA P-256``, ``RSA 3072``, or the key class name for anything else."""
    if isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)):
        return f"ECDSA {_CURVES.get(key.curve.name, key.curve.name)}"
    if isinstance(key, (rsa.RSAPublicKey, rsa.RSAPrivateKey)):
        return f"RSA {key.key_size}"
    return type(key).__name__


def signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    """The hash to sign with: SHA-384 for P-384 keys, SHA-256 otherwise."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        return hashes.SHA384()
    return hashes.SHA256()


def public_key_der(key: object) -> bytes:
    """SubjectPublicKeyInfo DER of a public key, for comparing keys."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        key = key.public_key()
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise PKIError(f"unsupported key type {type(key).__name__}")
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
