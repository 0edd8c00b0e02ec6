"""The search query language, without I/O: parsing, the backends' query text, highlighting.

A query is a list of terms, every one of which must match (AND):

- ``word``: a message containing that word (letters and digits; case is ignored);
- ``"some words"``: those words next to each other in that order (a phrase);
- ``wor*``: a word starting with ``wor`` (at least :data:`MIN_PREFIX_CHARS`
  characters before the ``*``); ``"some wor"*`` makes the phrase's last word
  a prefix.

Words are split as the databases split them: a word is a run of letters and
digits, anything else separates words. A bare chunk with separators inside
(``example.com``, ``don't``) is therefore a phrase of its words. Nothing else
is syntax: ``AND``, ``OR``, ``NOT``, ``NEAR``, parentheses, ``:``, ``^``,
``-`` or ``+`` are ordinary text (separators or words), so no input can reach
FTS5's or PostgreSQL's query syntax: :func:`fts5_match` and
:func:`tsquery_text` emit only quoted letters-and-digits tokens and their own
operators. An unterminated ``"`` runs to the end of the query.

:func:`parse` raises :class:`QueryError` (a ValueError) and nothing else.

Mentions (:func:`mentions`), the other text matching the storage does
(mention counts), are here too: this module imports only the standard
library, so the storage layer may use it.

Highlights (:func:`highlight`): the body with each match wrapped in
:data:`MARK_START` (U+0002) and :data:`MARK_END` (U+0003); those two
characters occurring in the body itself are replaced with U+FFFD first, so
every mark in a highlight is one the server put there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MARK_END",
    "MARK_START",
    "MAX_QUERY_CHARS",
    "MAX_TERMS",
    "MIN_PREFIX_CHARS",
    "Query",
    "QueryError",
    "Term",
    "fts5_match",
    "highlight",
    "mentions",
    "parse",
    "tsquery_text",
    "words_of",
]

#: The longest query accepted, in characters (longer: QueryError, HTTP 400 bad_request).
MAX_QUERY_CHARS: Final = 200
#: The most terms (words, phrases, prefixes) one query may hold.
MAX_TERMS: Final = 8
#: The shortest prefix before ``*``: ``a*`` would walk most of the index.
MIN_PREFIX_CHARS: Final = 2
#: Opens a match in a highlight (STX).
MARK_START: Final = "\x02"
#: Closes a match in a highlight (ETX).
MARK_END: Final = "\x03"

# A word: letters and digits (Unicode), i.e. \w without the underscore; the
# databases' tokenizers (FTS5 unicode61, PostgreSQL's [[:alnum:]]) agree.
_WORD: Final = re.compile(r"[^\W_]+")
_MARKS: Final = re.compile("[\x02\x03]")
# Characters of a user name (protocol.ROOM_PATTERN: names and rooms share the rule).
_NAME_CHAR: Final = r"A-Za-z0-9_.\-"


class QueryError(ValueError):
    """The query cannot be searched for: empty, too long, too many terms or too short a prefix."""


@dataclass(frozen=True, slots=True)
class Term:
    """One term: its words in order (lowercase; one for a word, more for a phrase).

    ``prefix``: the last word matches any word it begins.
    """

    words: tuple[str, ...]
    prefix: bool


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed query: every term must match."""

    terms: tuple[Term, ...]


def words_of(text: str) -> list[str]:
    """The words of ``text``, lowercase, as the search index splits them."""
    return [match.group().lower() for match in _WORD.finditer(text)]


def _chunks(text: str) -> list[tuple[str, bool]]:
    """Split a query into ``(text, prefix)`` chunks: quoted phrases and bare runs."""
    chunks: list[tuple[str, bool]] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char.isspace():
            i += 1
            continue
        if char == '"':
            end = text.find('"', i + 1)
            end = n if end < 0 else end
            inner = text[i + 1 : end]
            i = end + 1
            prefix = i < n and text[i] == "*"
            if prefix:
                i += 1
            chunks.append((inner, prefix))
            continue
        start = i
        while i < n and not text[i].isspace() and text[i] != '"':
            i += 1
        bare = text[start:i]
        # A "*" extends the word it touches: "ab*" is a prefix, "ab-*" the word ab.
        stem = bare.rstrip("*")
        chunks.append((bare, stem != bare and _WORD.fullmatch(stem[-1:]) is not None))
    return chunks


def parse(text: str) -> Query:
    """Parse a search query.

    Raises:
        QueryError: longer than :data:`MAX_QUERY_CHARS`, no word in it, more
            than :data:`MAX_TERMS` terms, or a prefix shorter than
            :data:`MIN_PREFIX_CHARS`.
    """
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"the query is longer than {MAX_QUERY_CHARS} characters")
    terms: list[Term] = []
    for chunk, prefix in _chunks(text):
        words = tuple(words_of(chunk))
        if not words:
            continue
        term = Term(words, prefix)
        if term.prefix and len(words[-1]) < MIN_PREFIX_CHARS:
            raise QueryError(f"a prefix needs at least {MIN_PREFIX_CHARS} letters or digits")
        if term not in terms:
            terms.append(term)
    if not terms:
        raise QueryError("the query has no word to search for")
    if len(terms) > MAX_TERMS:
        raise QueryError(f"the query has more than {MAX_TERMS} terms")
    return Query(tuple(terms))


def fts5_match(query: Query) -> str:
    """The FTS5 MATCH expression of ``query``: quoted strings, ``*`` and ``AND`` only."""
    parts = []
    for term in query.terms:
        # Words hold letters and digits only; doubling quotes is defence in depth.
        quoted = '"' + " ".join(term.words).replace('"', '""') + '"'
        parts.append(quoted + (" *" if term.prefix else ""))
    return " AND ".join(parts)


def _lexeme(word: str, prefix: bool) -> str:
    escaped = word.replace("\\", "\\\\").replace("'", "''")
    return f"'{escaped}'" + (":*" if prefix else "")


def tsquery_text(query: Query) -> str:
    """The PostgreSQL ``to_tsquery('simple', ...)`` text: quoted lexemes, ``<->``, ``&``, ``:*``."""
    parts = []
    for term in query.terms:
        last = len(term.words) - 1
        lexemes = [_lexeme(w, term.prefix and i == last) for i, w in enumerate(term.words)]
        parts.append("(" + " <-> ".join(lexemes) + ")")
    return " & ".join(parts)


def _matches(word: str, wanted: str, prefix: bool) -> bool:
    return word.startswith(wanted) if prefix else word == wanted


def highlight(body: str, query: Query) -> str:
    """``body`` with every match of ``query`` wrapped in :data:`MARK_START` ... :data:`MARK_END`.

    A phrase is marked as one span from its first word to its last;
    overlapping spans merge.
    """
    text = _MARKS.sub("\ufffd", body)
    found = [(m.start(), m.end(), m.group().lower()) for m in _WORD.finditer(text)]
    spans: list[tuple[int, int]] = []
    for term in query.terms:
        size = len(term.words)
        for i in range(len(found) - size + 1):
            if all(
                _matches(found[i + k][2], word, term.prefix and k == size - 1)
                for k, word in enumerate(term.words)
            ):
                spans.append((found[i][0], found[i + size - 1][1]))
    if not spans:
        return text
    spans.sort()
    merged = [spans[0]]
    for start, end in spans[1:]:
        if start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    out: list[str] = []
    cursor = 0
    for start, end in merged:
        out += [text[cursor:start], MARK_START, text[start:end], MARK_END]
        cursor = end
    out.append(text[cursor:])
    return "".join(out)


def mentions(body: str, username: str) -> bool:
    """Whether ``body`` mentions ``@username`` (ignoring case) as a whole name.

    ``@alice`` counts in "hi @alice", "@Alice:" or "(@alice)" and at a
    sentence's end ("thanks @alice."), not in "@alicent", "@alice.b" (another
    name) or "bob@alice.example" (an address).
    """
    pattern = rf"(?<![{_NAME_CHAR}])@{re.escape(username)}(?![A-Za-z0-9_\-])(?!\.[{_NAME_CHAR}])"
    return re.search(pattern, body, re.IGNORECASE) is not None
