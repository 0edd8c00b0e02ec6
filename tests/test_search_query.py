"""The search query language (tornado_chat/search_query.py), without a server.

Property tests: no input raises anything but QueryError; what reaches FTS5 or
PostgreSQL is only quoted letters-and-digits tokens and the module's own
operators (checked by a grammar, by running every generated expression
against a real FTS5 table, and 500 seeded ones through PostgreSQL's
to_tsquery); highlights keep the body's text.
"""

from __future__ import annotations

import random
import re
import sqlite3
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.netfault import _pg_admin
from tornado_chat.search_query import (
    MARK_END,
    MARK_START,
    MAX_QUERY_CHARS,
    MAX_TERMS,
    Query,
    QueryError,
    Term,
    fts5_match,
    highlight,
    parse,
    tsquery_text,
    words_of,
)

# What a query may be made of: FTS5 and tsquery syntax, quotes, stars,
# separators, letters of several scripts, digits, controls and the marks.
SYNTAX = st.lists(
    st.sampled_from(
        [*list("\"*'()^:+-{}[]\\,. \t\nab"), "AND", "OR", "NOT", "NEAR", "é", "東", "7", "\x02"]
    ),
    max_size=40,
).map("".join)
ANY_TEXT = st.text(max_size=MAX_QUERY_CHARS + 20)

_TOKEN = r"[^\W_]+"
FTS5_GRAMMAR = re.compile(
    rf'"{_TOKEN}(?: {_TOKEN})*"(?: \*)?(?: AND "{_TOKEN}(?: {_TOKEN})*"(?: \*)?)*'
)
_LEXEME = rf"'{_TOKEN}'(?::\*)?"
TSQUERY_GRAMMAR = re.compile(
    rf"\({_LEXEME}(?: <-> {_LEXEME})*\)(?: & \({_LEXEME}(?: <-> {_LEXEME})*\))*"
)


@pytest.fixture(scope="module")
def fts5() -> Iterator[sqlite3.Connection]:
    """An in-memory FTS5 table with the tokenizer revision 0004 uses, and a few rows."""
    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE t USING fts5(body, tokenize='unicode61 remove_diacritics 0')")
    db.executemany(
        "INSERT INTO t (body) VALUES (?)",
        [("a big cat",), ("example.com and NEAR",), ("東 é 7",), ("or and not",)],
    )
    yield db
    db.close()


def _parse_or_none(text: str) -> Query | None:
    try:
        return parse(text)
    except QueryError:
        return None


@given(st.one_of(SYNTAX, ANY_TEXT))
def test_no_input_raises_anything_but_query_error(text: str) -> None:
    """Every string parses or raises QueryError; a parsed query has 1 to MAX_TERMS terms."""
    query = _parse_or_none(text)
    if query is not None:
        assert 1 <= len(query.terms) <= MAX_TERMS
        assert all(term.words for term in query.terms)


@given(st.one_of(SYNTAX, ANY_TEXT))
def test_backend_text_is_only_quoted_tokens_and_own_operators(text: str) -> None:
    """The FTS5 and tsquery texts follow the module's grammar, whatever the input."""
    query = _parse_or_none(text)
    if query is not None:
        assert FTS5_GRAMMAR.fullmatch(fts5_match(query)), fts5_match(query)
        assert TSQUERY_GRAMMAR.fullmatch(tsquery_text(query)), tsquery_text(query)


@given(SYNTAX)
def test_fts5_accepts_every_generated_expression(fts5: sqlite3.Connection, text: str) -> None:
    """FTS5 never rejects an expression built from any input (no syntax gets through)."""
    query = _parse_or_none(text)
    if query is not None:
        fts5.execute("SELECT rowid FROM t WHERE t MATCH ?", (fts5_match(query),)).fetchall()


def test_operators_are_words(fts5: sqlite3.Connection) -> None:
    """AND, OR, NOT, NEAR and column filters are searched as text, not obeyed."""
    query = parse("or and not")
    assert query.terms == (Term(("or",), False), Term(("and",), False), Term(("not",), False))
    rows = fts5.execute("SELECT body FROM t WHERE t MATCH ?", (fts5_match(query),)).fetchall()
    assert rows == [("or and not",)]
    assert parse("body:cat").terms == (Term(("body", "cat"), False),)
    assert parse("NEAR(a b)").terms == (Term(("near", "a"), False), Term(("b",), False))


@pytest.mark.parametrize(
    ("text", "terms"),
    [
        ("Hello  WORLD", [(("hello",), False), (("world",), False)]),
        ('"big cat" dog*', [(("big", "cat"), False), (("dog",), True)]),
        ('"one tw"*', [(("one", "tw"), True)]),
        ("example.com", [(("example", "com"), False)]),
        ("don't", [(("don", "t"), False)]),
        ("ab-*", [(("ab",), False)]),
        ("ab *", [(("ab",), False)]),
        ('unterminated "phrase here', [(("unterminated",), False), (("phrase", "here"), False)]),
        ("dup Dup DUP", [(("dup",), False)]),
        ("snake_case", [(("snake", "case"), False)]),
        ("café 東京", [(("café",), False), (("東京",), False)]),
    ],
)
def test_parse_examples(text: str, terms: list[tuple[tuple[str, ...], bool]]) -> None:
    """Words, phrases, prefixes, separators inside a word, duplicates."""
    assert parse(text) == Query(tuple(Term(words, prefix) for words, prefix in terms))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no word"),
        ('  "" * -- ', "no word"),
        ("a*", "prefix needs at least 2"),
        ('"big c"*', "prefix needs at least 2"),
        ("x" * (MAX_QUERY_CHARS + 1), f"longer than {MAX_QUERY_CHARS}"),
        (" ".join(f"w{i}" for i in range(MAX_TERMS + 1)), f"more than {MAX_TERMS} terms"),
    ],
)
def test_refused_queries(text: str, message: str) -> None:
    """Each refusal is a QueryError, which is a ValueError, saying why."""
    with pytest.raises(QueryError, match=message) as caught:
        parse(text)
    assert isinstance(caught.value, ValueError)


def test_query_of_exactly_the_limit_is_accepted() -> None:
    """MAX_QUERY_CHARS characters are fine; one more is not (above)."""
    assert parse("y" * MAX_QUERY_CHARS).terms == (Term(("y" * MAX_QUERY_CHARS,), False),)


def test_backend_texts() -> None:
    """The exact FTS5 and tsquery texts of a query with every kind of term."""
    query = parse('"big cat" dog* "one tw"*')
    assert fts5_match(query) == '"big cat" AND "dog" * AND "one tw" *'
    assert tsquery_text(query) == "('big' <-> 'cat') & ('dog':*) & ('one' <-> 'tw':*)"


@pytest.mark.parametrize(
    ("body", "text", "expected"),
    [
        ("A big cat and a dog", '"big cat" dog', "A \x02big cat\x03 and a \x02dog\x03"),
        ("Dogs, dogged dog", "dog*", "\x02Dogs\x03, \x02dogged\x03 \x02dog\x03"),
        ("big big cat", '"big cat" big', "\x02big\x03 \x02big cat\x03"),
        ("visit example.com now", "example.com", "visit \x02example.com\x03 now"),
        ("nothing here", "absent", "nothing here"),
        ("fake \x02mark\x03 cat", "cat", "fake \ufffdmark\ufffd \x02cat\x03"),
    ],
)
def test_highlight_examples(body: str, text: str, expected: str) -> None:
    """Matches are wrapped in STX/ETX; phrases as one span; the body's own marks are replaced."""
    assert highlight(body, parse(text)) == expected


@given(st.text(max_size=80), SYNTAX)
def test_highlight_keeps_the_text(body: str, text: str) -> None:
    """Removing the marks gives the body back (its own STX/ETX as U+FFFD); marks pair up."""
    query = _parse_or_none(text)
    if query is None:
        return
    marked = highlight(body, query)
    cleaned = body.replace(MARK_START, "\ufffd").replace(MARK_END, "\ufffd")
    assert marked.replace(MARK_START, "").replace(MARK_END, "") == cleaned
    assert re.fullmatch("[^\x02\x03]*(?:\x02[^\x02\x03]+\x03[^\x02\x03]*)*", marked)


def test_words_of_splits_like_the_index() -> None:
    """Letters and digits of any script; underscores and punctuation separate."""
    assert words_of("Hi_there, x2 — naïve 東京!") == ["hi", "there", "x2", "naïve", "東京"]


@pytest.mark.postgres
async def test_postgres_accepts_every_generated_tsquery() -> None:
    """PostgreSQL parses the tsquery text of 500 seeded syntax-laden inputs without error.

    A seeded stream instead of Hypothesis: one connection serves every case.
    """
    rng = random.Random(13)
    alphabet = [*"\"*'()^:+-&|!<>{}[]\\,. \t\nab", "AND", "OR", "<->", ":*", "é", "東", "7"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(500)]
    conn = await _pg_admin()
    try:
        checked = 0
        for text in texts:
            query = _parse_or_none(text)
            if query is not None:
                await conn.fetchval("SELECT to_tsquery('simple', $1)::text", tsquery_text(query))
                checked += 1
        assert checked > 250
    finally:
        await conn.close()
