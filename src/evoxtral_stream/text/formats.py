"""Caption files from caption events: SRT, WebVTT, JSONL and plain text.

Pure: every function returns a string; writing it is the caller's job.
:class:`SubtitleWriter` gives an SRT or WebVTT file in pieces, as finals
land, that add up to the same text.

SRT and WebVTT use the *final* events only. Their cues go in start order,
as WebVTT requires and SRT players expect (finals that overlap, from a
journal or another server, interleave; equal starts keep the order given,
which callers make the segments'), SRT numbered as written. Each final is
laid out in cues by :class:`CueLayout`, the usual subtitle practice: at
most 42 columns a line (:func:`.chars.display_width`: a CJK character or an emoji
sequence takes 2, a combining mark none) and 2 lines a cue, a cue at most
7 s and at least 5/6 s on screen (extended into the silence after it,
never over the next cue, nor past ``until``, the end of the audio, when
the caller knows it).
A cue left no time at all (a zero-length final) is shown for
:data:`MIN_SHOWN_S`, past ``until`` if need be. Lines break between words,
never inside a tag, and a tag stays with the word it precedes. Punctuation
written apart from its word (:func:`_glue_punctuation`: French ``demain ?``
and ``« Bonjour »``, whose no-break spaces the tokenizer reads as spaces, a
spaced Hindi ``।``) stays on its word's line, a few marks deep (a longer
run, a model's loop, breaks as words do), and ends its sentence there
(``« Oui ! »`` after the ``»``). Text written
without spaces (Chinese, Japanese) also breaks between its characters, as
UAX #14 and the kinsoku rules allow (:func:`_can_break`: never before
。、」）！？ or a small kana, never after 「（, never inside a Latin word),
where a line cannot hold the text between two spaces whole. A cue's times come from its words'
positions in the segment, interpolated linearly over the segment's span (as
``TagMark.t``; a word broken between lines shares its time among its
characters). A sentence end (also 。！？ and Hindi's ।) closes a cue once the cue holds a
full line.

Tags (:class:`TagStyle`): kept inline as written (``[laughs]``, what a TTS
voice wants), stripped (plain captions), or, in WebVTT only, wrapped in
class spans ``<c.tag.non-verbal.laughs>[laughs]</c>`` so a player's style
sheet can colour or hide them (``::cue(.tag) { visibility: hidden }``).

Text shows as written: WebVTT escapes ``&``, ``<`` and ``>``; SRT, which has
no escapes, gets look-alikes for what players take for markup
(:func:`_escape_srt`: ``<b>`` is written ``‹b›``, ``{\\an8}`` ``❴\\an8❵``)
and an invisible word joiner after the ``&`` of an entity (``&amp;``, and
``&copy`` or ``&amp`` without the semicolon, which HTML decodes too).
"""

from __future__ import annotations

import enum
import html.entities
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from itertools import pairwise

from ..events import CaptionEvent
from ..server.protocol import caption_to_dict
from .chars import display_width, graphemes, is_cjk
from .tags import Token, TokenKind, render, seams, tokenize, word_count

__all__ = [
    "MIN_SHOWN_S",
    "Cue",
    "CueLayout",
    "SubtitleWriter",
    "TagStyle",
    "build_cues",
    "format_timestamp",
    "to_jsonl",
    "to_srt",
    "to_text",
    "to_vtt",
]


#: How long a cue is shown when its caption gives it no time, and neither
#: the end of the audio nor ``min_cue_s`` leaves it any (a zero-length
#: final, one ending before it starts, or under a millisecond): WebVTT
#: requires a cue's end after its start, and SRT players skip such a cue.
#: Dropping it would lose its words. A quarter second is several frames of
#: any video, and a browser updates the cues it shows at least that often
#: (``timeupdate``, every 15 to 250 ms), so players show it. Less when the
#: next cue starts sooner (it ends there), but never under 1 ms as written.
MIN_SHOWN_S = 0.25


class TagStyle(enum.Enum):
    INLINE = "inline"
    STRIP = "strip"
    CLASS = "class"


@dataclass(frozen=True)
class CueLayout:
    """Line and duration limits of caption cues; ``max_line_chars`` counts
    display columns (:func:`.chars.display_width`)."""

    max_line_chars: int = 42
    max_lines: int = 2
    max_cue_s: float = 7.0
    min_cue_s: float = 5 / 6

    def __post_init__(self) -> None:
        if self.max_line_chars < 1 or self.max_lines < 1:
            raise ValueError("max_line_chars and max_lines must be at least 1")
        if self.max_cue_s <= 0 or self.min_cue_s < 0:
            raise ValueError("max_cue_s must be positive and min_cue_s not negative")


@dataclass(frozen=True)
class Cue:
    """One cue: seconds on the stream clock and its lines (with markup in
    ``TagStyle.CLASS``)."""

    start: float
    end: float
    lines: tuple[str, ...]


@dataclass(frozen=True)
class _Unit:
    """Text that never breaks: a word with its punctuation and the tags
    before it, or a piece of one written without spaces (:func:`_pieces`).
    ``w0`` and ``w1`` are word positions in the segment; a piece takes its
    word's share by characters."""

    markup: str
    width: int
    w0: Fraction
    w1: Fraction
    ends_sentence: bool
    glued: bool = False
    """Written right after the unit before it, with no space between."""
    run: int = 0
    """The width of this unit and the glued ones after it."""


def _escape_vtt(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# SRT has no escapes, yet players read markup in it: HTML-like tags (<b>,
# <i>, <u>, <font>; ExoPlayer and VLC any HTML), ASS override blocks
# ({\an8}; libass, behind mpv and ffmpeg, hides any {...}), ASS line breaks
# and hard spaces (\N, \n, \h), and HTML entities: &amp;, &#60, and the
# legacy names HTML decodes with no semicolon, even inside a word (&copy,
# &amp, &lt; "&notit" reads "¬it"). The legacy names are a closed list,
# frozen by the HTML standard; Python's HTML parser decodes the same.
_LEGACY_ENTITIES = "|".join(sorted((n for n in html.entities.html5 if not n.endswith(";")),
                                   key=len, reverse=True))
_SRT_LOOKALIKES = str.maketrans("<>{}", "\u2039\u203a\u2774\u2775")
_SRT_SEQUENCES = re.compile(
    rf"(?<=\\)(?=[Nnh])|(?<=&)(?=#|[A-Za-z][A-Za-z0-9]*;|(?:{_LEGACY_ENTITIES}))")


def _escape_srt(text: str) -> str:
    """``text`` that SRT players show as written: ``<>{}`` as the look-alikes
    ``‹›❴❵``, and a word joiner (U+2060, invisible) after a backslash or an
    ``&`` that would start an ASS escape or an HTML entity, with or without
    its semicolon (``R&D`` and ``AT&T`` stay as they are)."""
    return _SRT_SEQUENCES.sub("\u2060", text.translate(_SRT_LOOKALIKES))


def _slug(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "-", name.casefold()).strip("-")


def _chunk_markup(chunk: Sequence[Token], style: TagStyle, vtt: bool) -> tuple[str, str]:
    """(markup, visible text) of tokens written without spaces between."""
    if style is TagStyle.STRIP:
        text = render(chunk, tags=False)
        return _escape_vtt(text) if vtt else _escape_srt(text), text
    visible = render(chunk)
    if style is TagStyle.INLINE:
        return _escape_vtt(visible) if vtt else _escape_srt(visible), visible
    parts: list[str] = []
    for tok in chunk:
        if tok.is_tag and tok.tag_kind is not None:
            classes = ".".join(c for c in ("tag", tok.tag_kind.value, _slug(tok.tag or "")) if c)
            parts.append(f"<c.{classes}>{_escape_vtt(tok.text)}</c>")
        else:
            parts.append(_escape_vtt(tok.text))
    return "".join(parts), visible


# Line breaks in text written without spaces: UAX #14's basics and the
# Japanese kinsoku rules. A line may break between two characters where one is
# CJK (:func:`.chars.is_cjk`): a Han ideograph, kana (halfwidth too),
# bopomofo, Yi, a fullwidth letter or digit, CJK punctuation. Never before
# closing punctuation (UAX #14's CL, CP, EX, IS: 、。」）！？ and the ASCII , . ! ?
# ) too), a small kana, ー or 々 (NS, and CJ taken as NS, UAX #14's default),
# nor after opening punctuation (OP: 「（ and the ASCII ( [) or a currency sign.
# Hangul is left out: Korean is written with spaces and breaks there, as its
# subtitles do. So are Thai, Lao, Khmer and Burmese (UAX #14's SA): without a
# dictionary to find their word ends, UAX #14 breaks none of their text (LB1:
# SA as AL).
_NO_START = frozenset(
    "ー々〻ゝゞヽヾｰぁぃぅぇぉっゃゅょゎゕゖァィゥェォッャュョヮヵヶｧｨｩｪｫｬｭｮｯ"
    + "".join(map(chr, range(0x31F0, 0x3200))))


def _opens(c: str) -> bool:
    return unicodedata.category(c) in ("Ps", "Pi", "Sc") or c in "¿¡"


def _closes(c: str) -> bool:
    return c in _NO_START or (unicodedata.category(c) in ("Pe", "Pf", "Po", "Pd")
                              and c not in "¿¡")


def _can_break(before: str, after: str) -> bool:
    """Whether a line may break between two characters (grapheme clusters)
    written without a space between them."""
    a, b = before[0], after[0]
    return (is_cjk(a) or is_cjk(b)) and not _closes(b) and not _opens(a)


def _pieces(chunk: Sequence[Token], w: int) -> list[tuple[list[Token], Fraction, Fraction]]:
    """``chunk`` (tokens written without spaces, and the tags before them)
    cut where a line may break (:func:`_can_break`): each piece's tokens,
    cut in grapheme clusters where need be, and its word positions, ``w``
    the chunk's first. A tag stays with what follows it; a word's clusters
    share its one word position."""
    if not any(is_cjk(c) for tok in chunk if not (tok.is_tag or tok.text.isascii())
               for c in tok.text):
        return [(list(chunk), Fraction(w), Fraction(w + word_count(chunk)))]
    # (token index, cluster index, cluster); a tag is one cluster.
    atoms: list[tuple[int, int, str]] = []
    sizes: list[int] = []
    for i, tok in enumerate(chunk):
        parts = [tok.text] if tok.is_tag else graphemes(tok.text)
        sizes.append(len(parts))
        atoms.extend((i, k, g) for k, g in enumerate(parts))
    bases: list[int] = []
    for tok in chunk:
        bases.append(w)
        w += int(tok.is_word)
    last_word = max((j for j, (i, _, _) in enumerate(atoms) if not chunk[i].is_tag),
                    default=-1)

    def pos(i: int, k: int) -> Fraction:
        return bases[i] + (Fraction(k, sizes[i]) if chunk[i].is_word else Fraction(0))

    cuts = [0]
    for j in range(1, len(atoms)):
        i, k, g = atoms[j]
        pi, _, pg = atoms[j - 1]
        tok = chunk[i]
        if (k == 0 and tok.space_before) or chunk[pi].is_tag:
            continue  # a tag and the word it is written with
        if tok.is_tag:
            # Like an opening bracket, and only before text it stays with.
            if j < last_word and _can_break(pg, "["):
                cuts.append(j)
        elif _can_break(pg, g):
            cuts.append(j)
    cuts.append(len(atoms))
    out: list[tuple[list[Token], Fraction, Fraction]] = []
    for a, b in pairwise(cuts):
        toks: list[Token] = []
        for j in range(a, b):
            i, k, g = atoms[j]
            if j > a and atoms[j - 1][0] == i:
                toks[-1] = replace(toks[-1], text=toks[-1].text + g)
            else:
                toks.append(replace(chunk[i], text=g,
                                                space_before=chunk[i].space_before and k == 0))
        (i0, k0, _), (i1, k1, _) = atoms[a], atoms[b - 1]
        out.append((toks, pos(i0, k0), pos(i1, k1 + 1)))
    return out


# Punctuation written apart from its word, as French writes ? ! : ; and
# « » (after a no-break space, which the tokenizer reads as a space) and
# Hindi often writes its danda: it stays on the word's line (UAX #14's LB13
# and LB14, and what a no-break space asks for). Not the ambiguous quotes,
# dashes or signs such as & and # (a line may break beside them).
_NOT_TRAILING = frozenset("¿¡⸘#&*@\\/§¶†‡※\"'")


def _trails(c: str) -> bool:
    """Whether punctuation starting with ``c`` belongs to the word before it."""
    cat = unicodedata.category(c)
    return cat in ("Pe", "Pf") or (cat == "Po" and c not in _NOT_TRAILING)


def _leads(c: str) -> bool:
    """Whether punctuation ending with ``c`` belongs to the word after it."""
    return unicodedata.category(c) in ("Ps", "Pi") or c in "¿¡⸘"


def _bare(chunk: Sequence[Token]) -> str:
    """The punctuation of a chunk that holds no word ("" if it holds one)."""
    if any(t.is_word for t in chunk):
        return ""
    return "".join(t.text for t in chunk if t.is_punct)


#: The most chunks :func:`_glue_punctuation` joins to one (``« Oui ! »``
#: is four): a model looping on spaced marks ("Hmm ... ... ...") would
#: otherwise make one unbreakable line of them all, however wide.
_GLUED_AT_MOST = 5


def _glue_punctuation(chunks: list[list[Token]]) -> list[list[Token]]:
    """``chunks`` with each one of bare closing punctuation joined to the
    chunk before it and each one of bare opening punctuation to the chunk
    after it: a line never starts with a lone ``?``, ``»`` or ``।``, nor
    ends with a lone ``«`` or ``¿`` (but past :data:`_GLUED_AT_MOST` chunks
    in a row)."""
    out: list[list[Token]] = []
    joined = 0
    for c in chunks:
        bare = _bare(c)
        if (out and joined < _GLUED_AT_MOST
                and ((bare and _trails(bare[0])) or _leads((_bare(out[-1]) or " ")[-1]))):
            out[-1] = [*out[-1], *c]
            joined += 1
        else:
            out.append(list(c))
            joined = 1
    return out


def _ends_sentence(tokens: Sequence[Token]) -> bool:
    """Whether ``tokens`` end a sentence: their last punctuation after the
    last word, taken together (``Oui ! »`` does), tags aside."""
    marks: list[str] = []
    for tok in reversed(tokens):
        if tok.is_word:
            break
        if tok.is_punct:
            marks.append(tok.text)
    return bool(marks) and Token(TokenKind.PUNCT, "".join(reversed(marks))).ends_sentence


def _units(tokens: Sequence[Token], style: TagStyle, vtt: bool) -> list[_Unit]:
    chunks: list[list[Token]] = []
    for tok in tokens:
        if tok.space_before or not chunks:
            chunks.append([tok])
        else:
            chunks[-1].append(tok)
    if style is not TagStyle.STRIP:
        # A run of tags stays with the word after it (or, at the end, the
        # word before it).
        merged: list[list[Token]] = []
        pending: list[Token] = []
        for c in chunks:
            if all(t.is_tag for t in c):
                pending.extend(c)
                continue
            merged.append([*pending, *c])
            pending = []
        if pending:
            if merged:
                merged[-1].extend(pending)
            else:
                merged.append(pending)
        chunks = merged
    chunks = _glue_punctuation(chunks)
    units: list[_Unit] = []
    w = 0
    for c in chunks:
        glued = False
        first = len(units)
        for piece, w0, w1 in _pieces(c, w):
            # Inside a merged unit, tags and words keep their own spacing.
            parts: list[tuple[str, str]] = []
            group: list[Token] = []
            for tok in piece:
                if tok.space_before and group:
                    parts.append(_chunk_markup(group, style, vtt))
                    group = []
                group.append(tok)
            if group:
                parts.append(_chunk_markup(group, style, vtt))
            markup = " ".join(m for m, _ in parts if m)
            visible = " ".join(v for _, v in parts if v)
            if not visible:
                continue
            width = display_width(visible)
            units.append(_Unit(markup, width, w0, w1, _ends_sentence(piece), glued, width))
            glued = True
        if len(units) > first + 1:
            units[first] = replace(
                units[first], run=sum(u.width for u in units[first:]))
        w += word_count(c)
    return units


def _event_cues(event: CaptionEvent, style: TagStyle, layout: CueLayout,
                vtt: bool) -> list[Cue]:
    tokens = tokenize(event.text)
    if style is TagStyle.STRIP:
        # Lay out the plain text itself, so "a [laughs]." reads "a.".
        tokens = tokenize(render(tokens, tags=False))
    units = _units(tokens, style, vtt)
    if not units:
        return []
    n = units[-1].w1
    span = max(0.0, event.end - event.start)

    def at(word: Fraction) -> float:
        # Whole words as span * word / n, exact fractions of a word too.
        return (event.start + span * word.numerator / word.denominator / float(n) if n
                else event.start)

    cues: list[Cue] = []
    lines: list[list[_Unit]] = [[]]
    first: _Unit | None = None

    def width(line: list[_Unit]) -> int:
        return sum(u.width for u in line) + sum(not u.glued for u in line[1:])

    def joined(line: list[_Unit]) -> str:
        return "".join(("" if i == 0 or u.glued else " ") + u.markup
                       for i, u in enumerate(line))

    def close(last: _Unit) -> None:
        nonlocal lines, first
        if first is None:
            return
        start, end = at(first.w0), at(last.w1)
        if n == 0:
            end = event.end
        text = tuple(joined(line) for line in lines if line)
        cues.append(Cue(start, end, text))
        lines = [[]]
        first = None

    prev: _Unit | None = None
    for u in units:
        if first is not None and prev is not None:
            line = lines[-1]
            # Text written without spaces breaks between its characters
            # only where a line cannot hold it whole: a space is the
            # better place (Chinese and Japanese subtitles put spaces
            # between phrases).
            need = u.run if u.run <= layout.max_line_chars else u.width
            fits_line = width(line) + (not u.glued) + need <= layout.max_line_chars
            # A cue that holds no word yet ("...", "[sighs]...") takes no
            # time: closed, it would be a zero-length cue under the next.
            too_long = (prev.w1 > first.w0
                        and at(u.w1) - at(first.w0) > layout.max_cue_s)
            if too_long or (not fits_line and len(lines) >= layout.max_lines):
                close(prev)
            elif not fits_line:
                lines.append([])
        if first is None:
            first = u
        lines[-1].append(u)
        prev = u
        full = sum(width(line) for line in lines) >= layout.max_line_chars
        if u.ends_sentence and full and u.w1 > first.w0:
            close(u)
    if prev is not None:
        close(prev)
    return cues


def build_cues(events: Iterable[CaptionEvent], *, tags: TagStyle = TagStyle.INLINE,
               layout: CueLayout | None = None, vtt: bool = False,
               until: float | None = None) -> list[Cue]:
    """The cues of the final events (see module doc); ``vtt`` escapes the
    text for WebVTT. ``until`` is where the audio ends: no cue is stretched
    past it to its minimum length (a caption's own end is kept, and a cue
    it would leave no time gets :data:`MIN_SHOWN_S`)."""
    lay = layout or CueLayout()
    cues: list[Cue] = []
    for event in events:
        if event.final and event.text:
            cues.extend(_event_cues(event, tags, lay, vtt))
    cues.sort(key=_start)  # stable: equal starts in the order given
    return [Cue(cue.start, _cue_end(cue, cues[i + 1].start if i + 1 < len(cues) else None,
                                    lay, until), cue.lines)
            for i, cue in enumerate(cues)]


class SubtitleWriter:
    """SRT or WebVTT text of one stream's finals as they land, in pieces to
    append to a file: :meth:`header`, then what each :meth:`add` returns,
    then :meth:`finish`'s. Together they are exactly :func:`to_srt` (or
    :func:`to_vtt`) of those finals, given in segment order with ``until``,
    when none starts before the one before it ends (the merger's order).
    A final that does (overlapping ones) cannot put its cues before those
    given out already: the file stays in start order, each of its cues
    starting no earlier than the last cue given out. A cue is given out
    only once nothing can change it: its end waits for the next cue's
    start, and for the audio to have passed where ``until`` could clamp it
    (``until`` is at least the end of the latest final, whose audio has
    been heard). Normally only the last cue is held; one that starts where
    the cue after it does waits for a final that ends past its minimum
    length. Pure: the caller writes."""

    def __init__(self, *, vtt: bool = False, tags: TagStyle = TagStyle.INLINE,
                 layout: CueLayout | None = None) -> None:
        if tags is TagStyle.CLASS and not vtt:
            raise ValueError("SRT has no class spans: use TagStyle.INLINE or TagStyle.STRIP")
        self._vtt = vtt
        self._tags = tags
        self._layout = layout or CueLayout()
        self._held: list[Cue] = []
        self._written = 0
        self._given: float | None = None
        """The start of the last cue given out."""

    def header(self) -> str:
        return "WEBVTT\n" if self._vtt else ""

    def add(self, event: CaptionEvent) -> str:
        """The cues that ``event`` (a final; others are ignored) settled."""
        if not (event.final and event.text):
            return ""
        new = _event_cues(event, self._tags, self._layout, self._vtt)
        if self._given is not None:
            given = self._given
            new = [c if c.start >= given else Cue(given, max(c.end, given), c.lines)
                   for c in new]
        self._held = sorted([*self._held, *new], key=_start)
        done: list[Cue] = []
        while len(self._held) > 1:
            cue = self._held[0]
            end = _cue_end(cue, self._held[1].start, self._layout, None)
            if end > max(cue.end, event.end):
                break  # until, at least event.end, could still clamp it
            done.append(Cue(cue.start, end, cue.lines))
            del self._held[0]
        return self._blocks(done)

    def finish(self, until: float | None = None) -> str:
        """The cues still held; ``until`` as for :func:`build_cues`."""
        held, self._held = self._held, []
        return self._blocks([
            Cue(cue.start, _cue_end(cue, held[i + 1].start if i + 1 < len(held) else None,
                                    self._layout, until), cue.lines)
            for i, cue in enumerate(held)])

    def _blocks(self, cues: Sequence[Cue]) -> str:
        parts: list[str] = []
        for cue in cues:
            self._written += 1
            self._given = cue.start
            if self._vtt:
                parts.append("\n" + _vtt_block(cue))
            else:
                parts.append(("\n" if self._written > 1 else "") + _srt_block(self._written, cue))
        return "".join(parts)


def _start(cue: Cue) -> float:
    return cue.start


def _cue_end(cue: Cue, nxt: float | None, layout: CueLayout, until: float | None) -> float:
    """Where ``cue`` ends (:func:`build_cues`), the next cue starting at ``nxt``.

    Written, the end is always after the start (:data:`MIN_SHOWN_S`)."""
    end = max(cue.end, cue.start + layout.min_cue_s)
    if until is not None:
        end = min(end, max(cue.end, until))
    if nxt is not None and nxt > cue.start:
        end = min(end, nxt)
    if _ms(end) <= _ms(cue.start):
        # Not on ``until``: a cue past the end of the audio still shows on
        # its last frame, and the writer's pieces then need no ``until``.
        end = cue.start + MIN_SHOWN_S
        if nxt is not None and nxt > cue.start:
            end = min(end, nxt)
        end = max(end, (_ms(cue.start) + 1) / 1000)
    return end


def _ms(seconds: float) -> int:
    """``seconds`` in whole milliseconds, as :func:`format_timestamp` writes them."""
    return max(0, round(seconds * 1000))


def _srt_block(number: int, cue: Cue) -> str:
    times = f"{format_timestamp(cue.start)} --> {format_timestamp(cue.end)}"
    return f"{number}\n{times}\n" + "\n".join(cue.lines) + "\n"


def _vtt_block(cue: Cue) -> str:
    times = f"{format_timestamp(cue.start, '.')} --> {format_timestamp(cue.end, '.')}"
    return f"{times}\n" + "\n".join(cue.lines) + "\n"


def format_timestamp(seconds: float, sep: str = ",") -> str:
    """``HH:MM:SS,mmm`` (SRT) or, with ``sep="."``, ``HH:MM:SS.mmm`` (WebVTT)."""
    ms = _ms(seconds)
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(events: Iterable[CaptionEvent], *, tags: TagStyle = TagStyle.INLINE,
           layout: CueLayout | None = None, until: float | None = None) -> str:
    """SubRip text of the final events; ``TagStyle.CLASS`` is WebVTT only.
    ``until``: the end of the audio (see :func:`build_cues`)."""
    if tags is TagStyle.CLASS:
        raise ValueError("SRT has no class spans: use TagStyle.INLINE or TagStyle.STRIP")
    return "\n".join(_srt_block(i, cue) for i, cue in enumerate(
        build_cues(events, tags=tags, layout=layout, until=until), start=1))


def to_vtt(events: Iterable[CaptionEvent], *, tags: TagStyle = TagStyle.INLINE,
           layout: CueLayout | None = None, until: float | None = None) -> str:
    """WebVTT text of the final events; ``until`` as for :func:`to_srt`."""
    return "\n".join(["WEBVTT\n", *map(_vtt_block, build_cues(
        events, tags=tags, layout=layout, vtt=True, until=until))])


def to_jsonl(events: Iterable[CaptionEvent]) -> str:
    """One JSON object per event (partials included), one per line: the
    protocol v1 caption messages, so files and the wire read alike."""
    return "".join(json.dumps(caption_to_dict(e), ensure_ascii=False) + "\n" for e in events)


def to_text(events: Iterable[CaptionEvent], *, tags: TagStyle = TagStyle.INLINE,
            paragraph_gap_s: float = 2.0) -> str:
    """The final captions as running text: finals joined by a space, or by
    none inside Chinese or Japanese text (:func:`.tags.seams`), a new line
    where the silence between two is at least ``paragraph_gap_s``."""
    if tags is TagStyle.CLASS:
        raise ValueError("plain text has no class spans: use TagStyle.INLINE or STRIP")
    finals = [(e, text) for e in events if e.final
              and (text := e.plain_text if tags is TagStyle.STRIP else e.text)]
    out: list[str] = []
    prev_end: float | None = None
    for (e, text), (between, _) in zip(finals, seams(t for _, t in finals), strict=True):
        if prev_end is not None:
            out.append("\n" if e.start - prev_end >= paragraph_gap_s else between)
        out.append(text)
        prev_end = e.end
    return "".join(out) + ("\n" if out else "")
