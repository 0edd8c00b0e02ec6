"""tornado_chat: a real-time chat server that is secure by default.

HTTPS and WSS only, JWT authentication, bcrypt passwords and a built-in local
certificate authority (:mod:`tornado_chat.pki`).
"""

__version__ = "0.1.0"
