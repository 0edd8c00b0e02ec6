#!/usr/bin/env python3
"""Container health check: GET /readyz over HTTPS verified against the node's CA.

Installed in the image as ``tornado-chat-healthcheck`` (see deploy/Containerfile)
and run by its ``HEALTHCHECK`` and by deploy/compose.yaml. Exit status 0 when
the node answers 200 (PostgreSQL and Redis both answer it), 1 otherwise, with
one line saying why. The certificate is always verified, host name included:
a node whose certificate does not chain to ``--cafile`` is unhealthy.

Defaults come from the node's own environment: ``https://localhost:$CHAT_PORT/readyz``
and the CA ``$CHAT_HEALTHCHECK_CAFILE`` (else ``/etc/tornado-chat/tls/ca.pem``).
Only the standard library is used, so it runs with any Python 3.10+.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

DEFAULT_CAFILE = "/etc/tornado-chat/tls/ca.pem"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; the exit status."""
    parser = argparse.ArgumentParser(prog="tornado-chat-healthcheck", description=__doc__)
    parser.add_argument(
        "url",
        nargs="?",
        default=f"https://localhost:{os.environ.get('CHAT_PORT', '8443')}/readyz",
        help="the readiness URL (default: https://localhost:$CHAT_PORT/readyz)",
    )
    parser.add_argument(
        "--cafile",
        default=os.environ.get("CHAT_HEALTHCHECK_CAFILE", DEFAULT_CAFILE),
        help=f"CA certificate that issued the node's certificate (default: {DEFAULT_CAFILE})",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default: 5)")
    args = parser.parse_args(argv)
    if not args.url.startswith("https://"):
        print(f"unhealthy: {args.url} is not an https:// URL", file=sys.stderr)
        return 1
    try:
        context = ssl.create_default_context(cafile=args.cafile)
    except (OSError, ssl.SSLError) as exc:
        print(f"unhealthy: cannot read the CA {args.cafile}: {exc}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout, context=context) as reply:  # noqa: S310 - https only, checked above
            status = reply.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ssl.SSLError) as exc:
        print(f"unhealthy: {args.url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {args.url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
