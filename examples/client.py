"""A minimal tornado_chat client: log in over HTTPS, chat over WSS.

TLS is verified against the local CA (``certs/ca.pem``); the access token
travels in the ``bearer.`` WebSocket subprotocol, never in the URL.

    python examples/client.py --user alice --password 'correct horse battery' --room lobby hello
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import urllib.error
import urllib.request

import websockets


def post(base: str, ctx: ssl.SSLContext, path: str, body: dict[str, str]) -> dict[str, object]:
    """POST a JSON body and return the JSON answer (errors carry a JSON body too)."""
    req = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, context=ctx) as resp:
            return dict(json.load(resp))
    except urllib.error.HTTPError as err:
        return dict(json.load(err))


async def chat(args: argparse.Namespace) -> None:
    """Register (if new), log in, join a room, send one message, print what arrives."""
    ctx = ssl.create_default_context(cafile=args.ca)  # trust only our CA
    creds = {"username": args.user, "password": args.password}
    post(args.url, ctx, "/api/register", creds)  # 409 when the user exists: fine
    login = post(args.url, ctx, "/api/login", creds)
    token = login["access_token"]
    ws_url = args.url.replace("https://", "wss://", 1) + f"/ws/{args.room}"
    async with websockets.connect(
        ws_url, ssl=ctx, subprotocols=["chat.v1", f"bearer.{token}"]
    ) as ws:
        welcome = json.loads(await ws.recv())
        print("welcome", welcome["room"], "online:", ", ".join(welcome["online"]))
        await ws.send(json.dumps({"type": "message", "body": args.text, "client_id": "c1"}))
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "message":
                print(f"#{frame['seq']} {frame['user']}: {frame['body']}")
                if frame.get("client_id") == "c1":  # our own message, stored
                    break


def main() -> None:
    """Parse the command line and chat."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="https://localhost:8443")
    p.add_argument("--ca", default="certs/ca.pem", help="CA certificate to trust")
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--room", default="lobby")
    p.add_argument("text", nargs="?", default="hello")
    asyncio.run(chat(p.parse_args()))


if __name__ == "__main__":
    main()
