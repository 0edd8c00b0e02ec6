"""Authentication: signing keys, tokens, passwords, the login throttle and the service.

One module per job:

- :mod:`~tornado_chat.auth.keyring`: the JWT signing keys and their file;
- :mod:`~tornado_chat.auth.tokens`: access JWTs, opaque secrets and their hashes;
- :mod:`~tornado_chat.auth.passwords`: password rules and bcrypt off the event loop;
- :mod:`~tornado_chat.auth.hash_queue`: bcrypt checks bounded and served fairly per address;
- :mod:`~tornado_chat.auth.throttle`: the throttle interface and the in-process one;
- :mod:`~tornado_chat.auth.throttle_redis`: the same policy shared through Redis
  (imported only with a Redis broker);
- :mod:`~tornado_chat.auth.service`: register, login, refresh, logout, tickets;
- :mod:`~tornado_chat.auth.cli`: ``python -m tornado_chat.keys``.
"""

from __future__ import annotations

from tornado_chat.auth.keyring import KeyRing
from tornado_chat.auth.passwords import PasswordHasher
from tornado_chat.auth.service import AuthService
from tornado_chat.auth.throttle import LoginThrottle, Throttle
from tornado_chat.auth.tokens import AccessClaims, TokenPair, TokenService

__all__ = [
    "AccessClaims",
    "AuthService",
    "KeyRing",
    "LoginThrottle",
    "PasswordHasher",
    "Throttle",
    "TokenPair",
    "TokenService",
]
