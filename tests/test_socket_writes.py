"""Fan-out writes: the Future-free path and Tornado's public write() deliver the same frames."""

from __future__ import annotations

import pytest

from tests.harness import Client
from tornado_chat.handlers import socket as socket_module


@pytest.mark.parametrize("without_future", [True, False])
async def test_both_write_paths_deliver_in_order(
    client: Client, monkeypatch: pytest.MonkeyPatch, without_future: bool
) -> None:
    """Messages, presence and echoes arrive complete and in order on either write path."""
    assert socket_module._WRITE_WITHOUT_FUTURE  # the installed Tornado takes the fast path
    monkeypatch.setattr(socket_module, "_WRITE_WITHOUT_FUTURE", without_future)
    tag = "f" if without_future else "p"
    a = await client.user(f"wr_{tag}_alice")
    b = await client.user(f"wr_{tag}_bob")
    sa, _ = await client.join(f"wr-{tag}", a["access_token"])
    sb, _ = await client.join(f"wr-{tag}", b["access_token"])
    assert (await sa.recv_type("presence"))["user"] == f"wr_{tag}_bob"
    for i in range(8):
        await sa.say("x" * (1 + i * 250), client_id=f"c{i}")
    got_a = await sa.messages(8)
    got_b = await sb.messages(8)
    assert (
        [m["body"] for m in got_a]
        == [m["body"] for m in got_b]
        == ["x" * (1 + i * 250) for i in range(8)]
    )
    assert [m["client_id"] for m in got_a] == [f"c{i}" for i in range(8)]
    seqs = [m["seq"] for m in got_b]
    assert seqs == list(range(seqs[0], seqs[0] + 8))
    sa.close()
    sb.close()
