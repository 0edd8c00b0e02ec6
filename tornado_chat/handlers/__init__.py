"""Tornado handlers: thin translations between HTTP/WebSocket and the chat modules."""
