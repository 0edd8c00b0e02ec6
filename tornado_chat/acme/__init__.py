"""Public certificates from an ACME CA (Let's Encrypt) beside the local CA.

``names`` decides which names are public, ``client`` speaks ACME through
certbot's ``acme`` package, ``manager`` obtains at start-up and renews in the
background, ``shared`` keeps processes and nodes from ordering at once.
Only ``client`` imports the ``[acme]`` extra (``acme``, ``josepy``).
"""

from __future__ import annotations

from tornado_chat.errors import ConfigError

__all__ = ["LETS_ENCRYPT_DIRECTORY", "LETS_ENCRYPT_STAGING_DIRECTORY", "AcmeError"]

#: Let's Encrypt's production and staging directories (--acme-directory default, --acme-staging).
LETS_ENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING_DIRECTORY = "https://acme-staging-v02.api.letsencrypt.org/directory"


class AcmeError(ConfigError):
    """The ACME CA refused or could not be reached (one line; exit 2 at start-up)."""
