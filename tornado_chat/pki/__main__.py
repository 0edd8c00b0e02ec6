"""``python -m tornado_chat.pki``: the certificate toolkit's command line."""

from __future__ import annotations

import sys

from tornado_chat.pki.cli import main

sys.exit(main())
