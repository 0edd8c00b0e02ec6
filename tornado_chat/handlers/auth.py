"""Account and token endpoints of the public contract."""

from __future__ import annotations

from tornado_chat.auth import TokenPair
from tornado_chat.errors import Unauthorized
from tornado_chat.handlers.base import BaseHandler


def _pair(pair: TokenPair) -> dict[str, object]:
    return {
        "access_token": pair.access_token,
        "token_type": "Bearer",
        "expires_in": pair.expires_in,
        "refresh_token": pair.refresh_token,
    }


class AuthRegisterHandler(BaseHandler):
    """``POST /api/register``: create an account."""

    async def post(self) -> None:
        """201 with the new user's id and name."""
        body = self.json_body()
        user = await self.services.auth.register(
            body.get("username"),
            body.get("password"),
            address=self.request.remote_ip or "",
            mode=self.services.registration,
            invite=body.get("invite"),
        )
        self.send_json({"id": user.id, "username": user.username}, status=201)


class AuthLoginHandler(BaseHandler):
    """``POST /api/login``: exchange a password for an access/refresh token pair."""

    async def post(self) -> None:
        """200 with the token pair; 401 or 429 otherwise."""
        body = self.json_body()
        pair = await self.services.auth.login(
            body.get("username"), body.get("password"), self.request.remote_ip or ""
        )
        self.send_json(_pair(pair))


class AuthRefreshHandler(BaseHandler):
    """``POST /api/token/refresh``: rotate a refresh token."""

    async def post(self) -> None:
        """200 with a new pair; reuse of a rotated token revokes its family."""
        body = self.json_body()
        pair = await self.services.auth.refresh(body.get("refresh_token"))
        self.send_json(_pair(pair))


class AuthLogoutHandler(BaseHandler):
    """``POST /api/logout``: revoke the session (its sockets close with 4401)."""

    async def post(self) -> None:
        """204."""
        claims = await self.authenticate()
        await self.services.auth.logout(claims)
        self.set_status(204)
        self.clear_header("Content-Type")
        self.finish()


class AuthMeHandler(BaseHandler):
    """``GET /api/me``: who the token belongs to."""

    async def get(self) -> None:
        """200 with id, username and whether the account is a server admin."""
        claims = await self.authenticate()
        user = await self.services.storage.get_user(claims.user_id)
        if user is None or user.deactivated_at is not None:
            # Deleted or deactivated while the session cache still vouched for it.
            raise Unauthorized("invalid_token", "access token is invalid or expired")
        self.send_json({"id": user.id, "username": user.username, "admin": user.is_admin})


class AuthTicketHandler(BaseHandler):
    """``POST /api/ws-ticket``: a single-use WebSocket ticket (at most 30 s)."""

    async def post(self) -> None:
        """200 with the ticket and its lifetime."""
        claims = await self.authenticate()
        ticket, expires_in = await self.services.auth.issue_ticket(claims)
        self.send_json({"ticket": ticket, "expires_in": expires_in})
