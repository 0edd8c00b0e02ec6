"""A minimal tornado_chat client: log in over HTTPS, chat over WSS.

It needs nothing beyond what ``pip install .`` brings (Tornado's own HTTP and
WebSocket clients). TLS is verified against the local CA (``certs/ca.pem``,
host name checked); the access token travels in the ``bearer.`` WebSocket
subprotocol, never in the URL. It logs in first and registers only when the
login is refused, so running it again does not count against the throttle.

    python examples/client.py --user alice --password 'correct horse battery' --room lobby hello
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import ssl
import sys

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClosedError, websocket_connect


class ChatError(Exception):
    """Something the person running the example can act on: printed as one line."""


async def post(url: str, ctx: ssl.SSLContext, body: dict[str, str]) -> tuple[int, dict]:
    """POST a JSON body; return the status and the JSON answer (errors carry one too)."""
    request = HTTPRequest(
        url,
        method="POST",
        body=json.dumps(body),
        headers={"Content-Type": "application/json"},
        ssl_options=ctx,
    )
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    if response.code == 599:  # no HTTP answer at all: refused, TLS failure, timeout
        raise response.error or ChatError(f"no answer from {url}")
    return response.code, json.loads(response.body or b"{}")


def refusal(status: int, answer: dict) -> ChatError:
    """The server's own words for a refusal: ``code: message`` (and when to retry)."""
    error = answer.get("error", {})
    text = f"{error.get('code', status)}: {error.get('message', 'refused')}"
    if status == 429:
        text += " (wait a little and run it again)"
    return ChatError(text)


async def log_in(base: str, ctx: ssl.SSLContext, user: str, password: str) -> str:
    """An access token: log in, or register and log in when the login is refused."""
    creds = {"username": user, "password": password}
    status, answer = await post(base + "/api/login", ctx, creds)
    if status == 401:  # unknown user (or a wrong password): try to register
        status, answer = await post(base + "/api/register", ctx, creds)
        if status == 409:
            raise ChatError(f"wrong password for {user} (the name is taken)")
        if status != 201:
            raise refusal(status, answer)
        status, answer = await post(base + "/api/login", ctx, creds)
    if status != 200:
        raise refusal(status, answer)
    return str(answer["access_token"])


async def chat(args: argparse.Namespace) -> None:
    """Log in, join a room, send one message, print what arrives until it comes back."""
    try:
        ctx = ssl.create_default_context(cafile=args.ca)  # trust only our CA
    except FileNotFoundError:
        raise ChatError(
            f"CA file {args.ca} not found: run from the server's directory or pass --ca"
        ) from None
    token = await log_in(args.url, ctx, args.user, args.password)
    ws_url = args.url.replace("https://", "wss://", 1) + f"/ws/{args.room}"
    ws = await websocket_connect(
        HTTPRequest(ws_url, ssl_options=ctx), subprotocols=["chat.v1", f"bearer.{token}"]
    )
    try:
        welcome = json.loads(await ws.read_message() or "{}")
        print("welcome", welcome["room"], "online:", ", ".join(welcome["online"]))
        frame = {"type": "message", "body": args.text, "client_id": "c1"}
        await ws.write_message(json.dumps(frame))
        while (text := await ws.read_message()) is not None:
            frame = json.loads(text)
            if frame["type"] == "message":
                print(f"#{frame['seq']} {frame['user']}: {frame['body']}")
                if frame.get("client_id") == "c1":  # our own message, stored
                    return
            elif frame["type"] == "error":
                raise ChatError(f"{frame['code']}: {frame['message']}")
        raise ChatError(f"the server closed the socket: {ws.close_code} {ws.close_reason or ''}")
    finally:
        ws.close()


def main() -> int:
    """Parse the command line and chat; a failure is one line on stderr and exit 1."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="https://localhost:8443")
    p.add_argument("--ca", default="certs/ca.pem", help="CA certificate to trust")
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--room", default="lobby")
    p.add_argument("text", nargs="?", default="hello")
    args = p.parse_args()
    # Tornado also logs a failed TLS handshake; the one line below already says why.
    logging.getLogger("tornado").setLevel(logging.ERROR)
    try:
        asyncio.run(chat(args))
    except ChatError as error:
        print(f"error: {error}", file=sys.stderr)
    except ConnectionRefusedError:
        print(f"error: nothing answers at {args.url}: is the server running?", file=sys.stderr)
    except OSError as error:  # TLS verification (ssl.SSLError), DNS
        print(f"error: cannot reach {args.url}: {error}", file=sys.stderr)
    except (HTTPClientError, WebSocketClosedError) as error:  # a timeout, a refused handshake
        print(f"error: {args.url}: {error}", file=sys.stderr)
    else:
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
