"""Group commit of chat messages.

Sockets submit messages; one drain task stores everything submitted since the
last commit in a single transaction (one fsync for many messages), then hands
the stored messages, in ``seq`` order, to the fan-out. A message is therefore
durable before anyone, its sender included, receives it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

from tornado_chat.errors import StorageError

if TYPE_CHECKING:
    from tornado_chat.storage import Storage, StoredMessage

log = logging.getLogger("tornado_chat.writer")

OriginT = TypeVar("OriginT")
# A message to store: storage.records.MessageItem (reply_to the sixth element).
Item = tuple[str, int, str, str, "str | None", "int | None"]
OnStored = Callable[[Sequence[tuple["StoredMessage", OriginT | None]]], None]


class MessageWriter(Generic[OriginT]):
    """Batches message inserts; ``OriginT`` is whatever identifies the sender (a hub member).

    Args:
        storage: where messages are stored.
        on_stored: called with each committed batch, in order, before the
            submitters are answered.
        max_batch: the most messages one transaction takes.
    """

    def __init__(
        self, storage: Storage, on_stored: OnStored[OriginT], *, max_batch: int = 256
    ) -> None:
        self._storage = storage
        self._on_stored = on_stored
        self._max_batch = max_batch
        self._queue: list[tuple[Item, OriginT | None, asyncio.Future[StoredMessage]]] = []
        # The batch being stored right now (taken off the queue).
        self._inflight: list[tuple[Item, OriginT | None, asyncio.Future[StoredMessage]]] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Messages submitted and not yet stored (or failed): queued plus in flight."""
        return len(self._queue) + len(self._inflight)

    def enqueue(
        self,
        room: str,
        user_id: int,
        username: str,
        body: str,
        client_id: str | None,
        origin: OriginT | None = None,
        reply_to: int | None = None,
    ) -> asyncio.Future[StoredMessage]:
        """Queue one message to be stored with the others of the same turn.

        Not a coroutine: the socket's path for a message (handlers/socket.py)
        costs no task or coroutine per message. ``reply_to``: the id of the
        message of ``room`` it answers (checked by the caller with
        ``Storage.get_message``; see ``Storage.append_message``).

        Returns:
            The future of the stored message; it fails with StorageError when
            the message was not stored, which must then not be acknowledged.

        Raises:
            StorageError: shutting down (nothing was queued).
        """
        if self._closed:
            raise StorageError("server is shutting down")
        fut: asyncio.Future[StoredMessage] = asyncio.get_running_loop().create_future()
        self._queue.append(((room, user_id, username, body, client_id, reply_to), origin, fut))
        if self._task is None:
            self._task = asyncio.ensure_future(self._drain())
        return fut

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._inflight = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                try:
                    stored = await self._storage.append_messages([item for item, _, _ in batch])
                    if len(stored) != len(batch):
                        raise StorageError(f"stored {len(stored)} of {len(batch)} messages")
                except Exception as exc:  # every failure must reach the submitters
                    err = exc if isinstance(exc, StorageError) else StorageError(str(exc))
                    if not isinstance(exc, StorageError):
                        log.error("storing %d messages failed", len(batch), exc_info=exc)
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(err)
                    self._inflight = []
                    continue
                self._inflight = []
                try:
                    pairs = [
                        (msg, origin) for msg, (_, origin, _) in zip(stored, batch, strict=True)
                    ]
                    self._on_stored(pairs)
                except Exception:  # fan-out trouble must not un-acknowledge a stored message
                    log.exception("fan-out of stored messages failed")
                for msg, (_, _, fut) in zip(stored, batch, strict=True):
                    if not fut.done():
                        fut.set_result(msg)
        finally:
            self._task = None

    async def close(self) -> None:
        """Refuse new messages and wait for pending ones to be stored (or abandoned)."""
        self._closed = True
        while self._task is not None:
            # wait() rather than await: cancelling close() leaves the stores
            # running, and an abandon() ends close() without an exception.
            await asyncio.wait((self._task,))

    def abandon(self) -> int:
        """Refuse new messages and give up on pending ones (shutdown out of time).

        Their submitters get StorageError (never an acknowledgement); a batch
        whose COMMIT was already sent may still have been stored.

        Returns:
            How many messages were pending.
        """
        self._closed = True
        pending = [*self._inflight, *self._queue]
        self._inflight, self._queue = [], []
        err = StorageError("server is shutting down; message not stored")
        for _, _, fut in pending:
            if not fut.done():
                fut.set_exception(err)
        if self._task is not None:
            self._task.cancel()
        return len(pending)
