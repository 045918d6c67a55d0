"""The tag vocabulary and a tokenizer for tagged text.

Tagged text is what the Evoxtral adapter writes, e.g.
``[nervous] So... [stammers] I was thinking... [clears throat] try that new
restaurant? [laughs] I mean, if you're FREE this weekend?``: words (CAPS marks
emphasis), punctuation, and inline ElevenLabs v3 audio tags. Tags are atomic
tokens, multi-word ones (``[clears throat]``) included.

The vocabulary is data (:data:`TAG_TABLE`): every tag has a canonical name, a
:class:`TagKind` and the variants that map onto it. Normalisation: case,
spacing, ``_``/``-``, fullwidth forms and trailing punctuation inside the
tag are ignored, and the variants ``(laughs)``, ``*sighs*``, ``[LAUGHTER]``,
``[Laughs]``, ``[laughing]`` all become ``[laughs]``. A square-bracketed tag
that is not in the table is kept verbatim and flagged ``known=False``.
Square brackets include the fullwidth ``［ ］`` of Chinese and Japanese
text; a tag is written back with ``[ ]``. Parentheses and asterisks make a
tag only around a known name, because they are ordinary punctuation too
(``(see below)``, ``*really*``). A tag wrapped once more
(``[[laughs]]``, ``([laughs])``, ``*[laughs]*``, ``**laughs**``,
``[(laughs)]``) is that one tag: the outer pair would be left in the plain
text. So is one in more pairs glued around it (``[[[laughs]]]``,
``*([laughs])*``). Square brackets make a tag only where the tag, written
back, reads back as one: ``[ (sighs)*a]`` would be written ``[(sighs)*a]``,
which is ``[``, the tag ``(sighs)``, then ``*a]``, so it is those. A text
normalised twice has the tokens it had once.

Brackets whose inner text holds a decimal digit (:func:`holds_digit`: any
script's, fullwidth or superscript ones too, as NFKC writes them) make no
tag: ``[1]`` (a citation), ``array[0]``, ``[2021]``, ``[10:30]``,
``[1990s]``, ``[2x speed]`` are text, the brackets punctuation and what
they hold words and punctuation, kept in the plain text and counted in tag
indexes. No ElevenLabs v3 tag holds a digit, and neither does any tag here:
a known name with a digit typed in (``[laughs 2x]``) is text too, as are the
wrapped forms (``[[1]]``, ``([1])``, ``[(1)]``). A tag inside such brackets
is still a tag (``[(laughs) 3]`` is ``[``, ``[laughs]``, ``3``, ``]``).

Tokens remember whether whitespace preceded them, so
``render(tokenize(s)) == s`` for any text with canonical tags and single
spaces (whitespace runs collapse to one space; leading and trailing
whitespace is dropped). Control characters (C0, DEL, C1) count as
whitespace: a model's byte tokens can write them (NUL, ESC), and in a
caption they would act on whatever shows or speaks it (a terminal's escape
sequences, espeak-ng's end of input). Bidi controls and the other invisible
format characters are dropped (all of Unicode's Cf but ZWNJ and ZWJ): they
would reorder or hide what a terminal, an editor or a player shows. A
lone surrogate (a byte that is no UTF-8, decoded with ``surrogateescape``)
is U+FFFD: no file or socket could take it. These rules are
:mod:`.chars`'s, which ``console.printable`` applies to any text shown.
Texts written one after the other (a stream's finals in a transcript) are
joined by :func:`seam`: a space, but none inside Chinese or Japanese.

Carry-over (:class:`Carry`): emotion and delivery tags describe the speech
that follows them, so they stay *in effect* until a tag of the same kind
replaces them or the sentence ends (``.``, ``!``, ``?``, Hindi's ``।``, see
:attr:`Token.ends_sentence`; an ellipsis does not end a sentence).
Non-verbal sounds and pauses are events and never carry. The merger uses
this to avoid repeating ``[whispers]`` when a forced split cuts whispered
speech in two.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from .chars import CONTROL, drop_hidden, is_cjk, is_mark, mend_surrogates

__all__ = [
    "PUNCT_TAG_MAX",
    "TAG_TABLE",
    "Carry",
    "TagKind",
    "TagSpec",
    "Token",
    "TokenKind",
    "holds_digit",
    "join_texts",
    "lookup_tag",
    "normalize",
    "normalize_tag_name",
    "plain_text",
    "render",
    "seam",
    "seams",
    "tag_word_indexes",
    "tokenize",
    "word_count",
]


class TagKind(enum.Enum):
    """What a tag describes. The value is the wire name (``TagMark.kind``)."""

    EMOTION = "emotion"
    NONVERBAL = "non-verbal"
    DELIVERY = "delivery"
    PAUSE = "pause"
    UNKNOWN = "unknown"

    @property
    def carries(self) -> bool:
        """True for kinds that stay in effect over the following speech."""
        return self in (TagKind.EMOTION, TagKind.DELIVERY)


@dataclass(frozen=True)
class TagSpec:
    """One tag: canonical name (lower case, single spaces), kind, whether the
    Evoxtral adapter was trained on it, and variants (already normalised by
    :func:`normalize_tag_name`) that map onto it."""

    name: str
    kind: TagKind
    trained: bool = False
    aliases: tuple[str, ...] = ()


_E, _N, _D, _P = TagKind.EMOTION, TagKind.NONVERBAL, TagKind.DELIVERY, TagKind.PAUSE

# The caption page (server/web/app.js) keeps a copy, for chips a caption's
# tags do not name; tests/clients/test_web.py holds the two equal.
TAG_TABLE: tuple[TagSpec, ...] = (
    # The 15 tags the adapter was trained on.
    TagSpec("pause", _P, True, ("pauses", "pausing", "paused")),
    TagSpec("sighs", _N, True, ("sigh", "sighing", "sighed")),
    TagSpec("whispers", _D, True, ("whisper", "whispering", "whispered")),
    TagSpec("nervous", _E, True, ("nervously",)),
    TagSpec("clears throat", _N, True, (
        "clear throat", "clearing throat", "throat clearing", "clears his throat",
        "clears her throat", "clearing his throat", "clearing her throat", "throat clear",
    )),
    TagSpec("laughs", _N, True, ("laugh", "laughing", "laughter", "laughed")),
    TagSpec("excited", _E, True, ("excitedly", "excitement")),
    TagSpec("gasps", _N, True, ("gasp", "gasping", "gasped")),
    TagSpec("stammers", _D, True, (
        "stammer", "stammering", "stutters", "stutter", "stuttering",
    )),
    TagSpec("frustrated", _E, True, ("frustration",)),
    TagSpec("calm", _E, True, ("calmly",)),
    TagSpec("angry", _E, True, ("angrily", "anger")),
    TagSpec("shouts", _D, True, (
        "shout", "shouting", "shouted", "yells", "yell", "yelling",
    )),
    TagSpec("sad", _E, True, ("sadly", "sadness")),
    TagSpec("crying", _D, True, ("cries", "cry")),
    # The wider ElevenLabs v3 set the adapter may emit (rare in its data or
    # inherited from the base model). Names seen in the Evoxtral scripts are
    # canonical as written there, so references round-trip unchanged.
    TagSpec("scared", _E, False, ("fearful", "afraid", "frightened")),
    TagSpec("emotional", _E),
    TagSpec("confused", _E, False, ("confusion",)),
    TagSpec("worried", _E, False, ("worriedly",)),
    TagSpec("curious", _E, False, ("curiously",)),
    TagSpec("curious tone", _E),
    TagSpec("serious", _E, False, ("seriously",)),
    TagSpec("happy", _E, False, ("happily",)),
    TagSpec("cheerful", _E, False, ("cheerfully",)),
    TagSpec("annoyed", _E),
    TagSpec("appalled", _E),
    TagSpec("thoughtful", _E, False, ("thoughtfully",)),
    TagSpec("surprised", _E),
    TagSpec("sarcastic", _E, False, ("sarcastically",)),
    TagSpec("mischievously", _E, False, ("mischievous",)),
    TagSpec("regretful", _E),
    TagSpec("resigned", _E),
    TagSpec("hesitant", _E),
    TagSpec("tired", _E),
    TagSpec("relieved", _E),
    TagSpec("hopeful", _E),
    TagSpec("anxious", _E, False, ("anxiously",)),
    TagSpec("disappointed", _E),
    TagSpec("embarrassed", _E),
    TagSpec("proud", _E),
    TagSpec("shocked", _E),
    TagSpec("disgusted", _E),
    TagSpec("determined", _E),
    TagSpec("bored", _E),
    TagSpec("sympathetic", _E),
    TagSpec("impatient", _E),
    TagSpec("panicked", _E, False, ("panicking", "panic")),
    TagSpec("sings", _D, False, ("singing", "sing", "sung")),
    TagSpec("mumbles", _D, False, ("mumbling", "mumble")),
    TagSpec("quietly", _D, False, ("softly",)),
    TagSpec("loudly", _D),
    TagSpec("rushed", _D, False, ("quickly", "fast")),
    TagSpec("slows down", _D, False, ("slowly",)),
    TagSpec("drawn out", _D),
    TagSpec("dramatically", _D, False, ("dramatic",)),
    TagSpec("deadpan", _D),
    TagSpec("flatly", _D),
    TagSpec("playfully", _D, False, ("playful",)),
    TagSpec("yawns", _N, False, ("yawn", "yawning")),
    TagSpec("sniffles", _N, False, ("sniffle", "sniffling", "sniffs", "sniff")),
    TagSpec("giggles", _N, False, ("giggle", "giggling")),
    TagSpec("chuckles", _N, False, ("chuckle", "chuckling")),
    TagSpec("laughs harder", _N),
    TagSpec("starts laughing", _N),
    TagSpec("laughs nervously", _N, False, ("nervous laughter", "nervous laugh")),
    TagSpec("wheezing", _N, False, ("wheezes",)),
    TagSpec("snorts", _N, False, ("snort", "snorting")),
    TagSpec("coughs", _N, False, ("cough", "coughing")),
    TagSpec("sneezes", _N, False, ("sneeze", "sneezing")),
    TagSpec("exhales", _N, False, ("exhale", "exhaling")),
    TagSpec("exhales sharply", _N),
    TagSpec("inhales", _N, False, ("inhale", "inhaling")),
    TagSpec("inhales deeply", _N),
    TagSpec("swallows", _N, False, ("swallow", "swallowing")),
    TagSpec("gulps", _N, False, ("gulp", "gulping")),
    TagSpec("groans", _N, False, ("groan", "groaning")),
    TagSpec("sobs", _N, False, ("sob", "sobbing")),
    TagSpec("screams", _N, False, ("scream", "screaming")),
    TagSpec("scoffs", _N, False, ("scoff", "scoffing")),
    TagSpec("hums", _N, False, ("hum", "humming")),
    TagSpec("whistles", _N, False, ("whistle", "whistling")),
    TagSpec("slams door", _N, False, ("door slams", "door slam")),
    TagSpec("applause", _N, False, ("applauding",)),
    TagSpec("clapping", _N, False, ("claps", "clap")),
    TagSpec("music", _N),
    TagSpec("gunshot", _N),
    TagSpec("explosion", _N),
    TagSpec("short pause", _P),
    TagSpec("long pause", _P),
    TagSpec("continues after a beat", _P, False, ("beat",)),
    TagSpec("hesitates", _P, False, ("hesitation", "hesitating")),
)


def _build_lookup(table: Sequence[TagSpec]) -> dict[str, TagSpec]:
    out: dict[str, TagSpec] = {}
    for spec in table:
        for name in (spec.name, *spec.aliases):
            if name in out:
                raise ValueError(f"tag name {name!r} is defined twice in TAG_TABLE")
            out[name] = spec
    return out


_LOOKUP = _build_lookup(TAG_TABLE)

_TAG_PUNCT_EDGES = ".,;:!?*()"

# Whitespace, and control characters counted as whitespace (module doc).
_SPACES = rf"[\s{CONTROL}]+"
_SPACE_RUN = re.compile(_SPACES)


def _collapse(s: str) -> str:
    """``s`` with each whitespace run (control characters too) as one space,
    none at the ends, and no hidden format character (module doc)."""
    return _SPACE_RUN.sub(" ", drop_hidden(s)).strip(" ")


def normalize_tag_name(raw: str) -> str:
    """Normalise a tag's inner text: fullwidth letters as ASCII (NFKC),
    case-folded, ``_``/``-`` as spaces, single spaces, no edge punctuation
    (``"Clears_Throat."`` -> ``"clears throat"``)."""
    s = unicodedata.normalize("NFKC", raw).casefold().replace("_", " ").replace("-", " ")
    return _collapse(s).strip(_TAG_PUNCT_EDGES + " ")


def lookup_tag(raw: str) -> TagSpec | None:
    """The table entry for a tag's inner text or one of its variants, or None."""
    return _LOOKUP.get(normalize_tag_name(raw))


#: Closing quotes and brackets, which may follow a sentence's end: German
#: closes its quotes with “ ‘ and, in guillemets, « ‹ („Ja!“, »Ja!«).
_CLOSERS = "\"')]}»”’“‘«‹›」』）】〕〉》"
# Opening brackets glued to a sentence's end ("it.[1]", "done!(see") are one
# punctuation token with it; the sentence still ends there.
_OPENERS = "([{［（「『【〔〈《"


class TokenKind(enum.Enum):
    WORD = "word"
    PUNCT = "punct"
    TAG = "tag"


@dataclass(frozen=True)
class Token:
    """One token of tagged text.

    ``text`` is what :func:`render` writes: words and punctuation as written,
    tags as ``[canonical name]`` (unknown tags: their bracketed text verbatim,
    spaces collapsed). ``tag`` is the canonical (for unknown tags:
    normalised) name, None for words and punctuation. ``known`` is False only
    for tags missing from :data:`TAG_TABLE`. ``space_before`` records whether
    whitespace preceded the token in its source.
    """

    kind: TokenKind
    text: str
    tag: str | None = None
    tag_kind: TagKind | None = None
    known: bool = True
    space_before: bool = False

    @property
    def is_word(self) -> bool:
        return self.kind is TokenKind.WORD

    @property
    def is_tag(self) -> bool:
        return self.kind is TokenKind.TAG

    @property
    def is_punct(self) -> bool:
        return self.kind is TokenKind.PUNCT

    @property
    def emphasis(self) -> bool:
        """A word written in CAPS (two or more capitals), as the seed counts it."""
        return self.is_word and _CAPS.search(self.text) is not None

    @property
    def carries(self) -> bool:
        """An emotion or delivery tag (stays in effect, see :class:`Carry`)."""
        return self.tag_kind is not None and self.tag_kind.carries

    @property
    def ends_sentence(self) -> bool:
        """Punctuation that ends a sentence: ``.``, ``!``, ``?``, the
        Chinese and Japanese ``。！？｡．``, the Devanagari danda ``।`` and
        ``॥`` (Hindi's full stop) and the Arabic ``؟`` and ``۔``, but not an
        ellipsis (closing quotes and brackets after them, ``」`` and German
        ``„Ja!“`` and ``»Ja!«`` too, are ignored, and so are opening
        brackets: ``it.[1]``)."""
        if not self.is_punct:
            return False
        s = self.text.rstrip(_OPENERS).rstrip(_CLOSERS)
        return (s.endswith(("!", "?", "。", "！", "？", "｡", "।", "॥", "؟", "۔"))
                or (s.endswith((".", "．")) and not s.endswith(("..", "．．"))))

    def with_space(self, space_before: bool) -> Token:
        if space_before == self.space_before:
            return self
        return Token(self.kind, self.text, self.tag, self.tag_kind, self.known, space_before)


_CAPS = re.compile(r"\b[A-Z]{2,}\b")

# A word: letters/digits joined by apostrophes, hyphens or ampersands
# (don't, I-I, R&D), digit groups joined by . , : (3.5, 1,000, 9:30), and a
# currency sign in front ($500).
_WORD = r"[$€£]?\w+(?:(?:['’&\-]|(?<=\d)[.,:](?=\d))\w+)*"
# What may follow a combining mark inside a word: word characters and the
# joins of _WORD (हिंदी-भाषी, cafe\u0301's).
_WORD_MORE = re.compile(r"(?:\w|['’&\-](?=\w)|(?<=\d)[.,:](?=\d))*")
# ( ) and * make a tag only around at most this many characters, whitespace
# runs counted as one and none at the ends: the inner text as render() writes
# it back, so a round trip recognises the same tags. Line breaks are
# whitespace like any other there for the same reason (render turns them
# into spaces).
PUNCT_TAG_MAX = 40
# Square brackets, the fullwidth ［ ］ too (Chinese, Japanese).
_BR, _PA, _AST = r"[\[［][^\[\]［］]*[\]］]", r"\([^()]+\)", r"\*[^*]+\*"
# Inside a second pair no ( ) or * tag holds a square bracket, as no square
# bracketed tag does: "[*]*]" is the tag "[*]" (what "[ *]" renders as) and
# "*]", not "[" around "*]*", or normalising twice would change the tokens.
_WRAPPED = r"\([^()\[\]［］]+\)|\*[^*\[\]［］]+\*"
_SCAN = re.compile(
    rf"(?P<space>{_SPACES})"
    rf"|(?P<wrap>[\[［(*](?:{_BR}|{_WRAPPED})[\]］)*])"
    rf"|(?P<br>{_BR})"
    rf"|(?P<pa>{_PA})"
    rf"|(?P<ast>{_AST})"
    rf"|(?P<word>{_WORD})"
    r"|(?P<punct>.)",
    re.DOTALL,
)


def _word_end(text: str, end: int) -> int:
    """Where the word _WORD matched up to ``end`` ends: combining marks are
    not ``\\w``, but a vowel sign or virama (क्योंकि, ที่) or an accent
    written apart (cafe\u0301) is part of the word, and so is what follows
    it."""
    n = len(text)
    while end < n and is_mark(text[end]):
        m = _WORD_MORE.match(text, end + 1)
        assert m is not None  # it matches the empty string
        end = m.end()
    return end


def holds_digit(text: str) -> bool:
    """Whether ``text`` holds a decimal digit once NFKC-normalised (``1``,
    ``١``, ``１``, ``¹``): brackets around one make no tag (module doc)."""
    return any(c.isdecimal() for c in unicodedata.normalize("NFKC", text))


def _tag_token(inner: str, verbatim: bool, space: bool) -> Token | None:
    if holds_digit(inner):
        # A citation, an index, a year, a time: text (module doc).
        return None
    spec = lookup_tag(inner)
    if spec is not None:
        return Token(TokenKind.TAG, f"[{spec.name}]", spec.name, spec.kind, True, space)
    if not verbatim:
        return None
    # A control character kept here would reach every caption and file.
    shown = _collapse(inner)
    if not shown:
        return None
    # Written "[shown]", the tag must read back as one token, or normalising
    # twice would change the tokens: "[ (sighs)*a]" is written "[(sighs)*a]",
    # which is "[" (the pair after it is closed by "*", no "]") and "(sighs)".
    back = _SCAN.match(f"[{shown}]")
    assert back is not None  # the last alternative matches any character
    if back.end() != len(shown) + 2:
        return None
    return Token(TokenKind.TAG, f"[{shown}]", normalize_tag_name(inner) or shown.casefold(),
                 TagKind.UNKNOWN, False, space)


_PAIRS = {"[": "]］", "［": "]］", "(": ")", "*": "*"}


def _bracketed(written: str, space: bool) -> Token | None:
    """The tag ``[...]``, ``(...)`` or ``*...*`` make, or None (module doc)."""
    inner = written[1:-1]
    if written[0] in "[［":
        return _tag_token(inner, True, space)
    if len(_collapse(inner)) <= PUNCT_TAG_MAX:
        return _tag_token(inner, False, space)
    return None


def _unwrap(out: list[Token], ends: list[int], closer: str, end: int) -> bool:
    """Whether ``closer`` (ending at ``end``) closes a pair glued around the
    tag ``out`` ends with; if so, the pair is dropped and the tag ends there.

    Such a pair is one more around a wrapped tag (``[[[laughs]]]``,
    ``*([a])*``): written ``[laughs]`` inside it, the next reading would
    take the tag as wrapped, so this one does (the module doc)."""
    if len(out) < 2 or not out[-1].is_tag or out[-1].space_before or not out[-2].is_punct:
        return False
    tag, opened = out[-1], out[-2]
    if closer not in _PAIRS.get(opened.text[-1], ""):
        return False
    del out[-2:]
    opened_end = ends[-2]
    del ends[-2:]
    if len(opened.text) > 1:
        out.append(Token(TokenKind.PUNCT, opened.text[:-1], space_before=opened.space_before))
        ends.append(opened_end - 1)
    else:
        tag = tag.with_space(opened.space_before)
    out.append(tag)
    ends.append(end)
    return True


def tokenize(text: str) -> list[Token]:
    """Split tagged text into words, punctuation and tags (see module doc).

    Adjacent punctuation characters form one token (``?!``, ``...``); a tag
    glued to a word (``hel[laughs]lo``) splits it without spaces, so the
    text still renders back unchanged. A word's combining marks (the vowel
    signs and viramas of Hindi or Thai, an accent written apart) are part of
    it: ``क्योंकि`` is one word.
    """
    return _tokenize(text)[0]


def _tokenize(text: str) -> tuple[list[Token], list[int]]:
    """:func:`tokenize`, and where each token ends in ``text`` once its
    hidden characters are dropped."""
    text = mend_surrogates(drop_hidden(text))
    out: list[Token] = []
    ends: list[int] = []
    space = False
    pos = 0
    n = len(text)
    while pos < n:
        m = _SCAN.match(text, pos)
        assert m is not None  # the last alternative matches any character
        group = m.lastgroup
        end = m.end()
        tok: Token | None = None
        if group == "space":
            space = True
            pos = end
            continue
        if group == "wrap":
            # A tag in a second pair of brackets (or asterisks): the tag
            # alone, lest the outer pair stay in the plain text.
            outer = m.group()
            if outer[-1] in _PAIRS[outer[0]]:
                tok = _bracketed(outer[1:-1], space)
                if tok is None and outer[0] in "[［" and outer[1] in "(*":
                    # Square brackets around no known tag: as they are.
                    tok = _tag_token(outer[1:-1], True, space)
        elif group in ("br", "pa", "ast"):
            tok = _bracketed(m.group(), space)
        elif group == "word":
            end = _word_end(text, end)
            tok = Token(TokenKind.WORD, text[pos:end], space_before=space)
        if tok is None:
            # Stray or empty brackets, punctuation, or ( * not around a known tag.
            ch = text[pos]
            prev = out[-1] if out else None
            if not space and _unwrap(out, ends, ch, pos + 1):
                pass  # it closed a pair glued around the tag before it
            elif prev is not None and prev.is_punct and not space:
                out[-1] = Token(TokenKind.PUNCT, prev.text + ch, space_before=prev.space_before)
                ends[-1] = pos + 1
            else:
                out.append(Token(TokenKind.PUNCT, ch, space_before=space))
                ends.append(pos + 1)
            pos += 1
        else:
            out.append(tok)
            ends.append(end)
            pos = end
        space = False
    if out and out[0].space_before:
        out[0] = out[0].with_space(False)
    return out, ends


def render(tokens: Iterable[Token], *, tags: bool = True) -> str:
    """Write tokens back as text; ``tags=False`` drops the tags.

    Without tags, a dropped tag's space is kept before a following word
    (``a [laughs]b`` -> ``a b``) but not before punctuation
    (``a [laughs].`` -> ``a.``), and ``hel[laughs]lo`` -> ``hello``.
    """
    return _render(tokens, tags)[0]


def _render(tokens: Iterable[Token], tags: bool) -> tuple[str, list[int]]:
    """:func:`render`, and where in its text each dropped tag was."""
    parts: list[str] = []
    dropped: list[int] = []
    length = 0
    pending = False
    for tok in tokens:
        if not tags and tok.is_tag:
            dropped.append(length)
            pending = pending or tok.space_before
            continue
        if parts and (tok.space_before or (pending and tok.is_word)):
            parts.append(" ")
            length += 1
        parts.append(tok.text)
        length += len(tok.text)
        pending = False
    return "".join(parts), dropped


def _cjk_punct(c: str) -> bool:
    return is_cjk(c) and unicodedata.category(c)[0] == "P"


def _unspaced(before: Sequence[Token], after: Sequence[Token]) -> bool:
    """Whether ``after`` follows ``before`` with no space (:func:`seam`)."""
    last = next((t.text for t in reversed(before) if not t.is_tag), "")
    first = next((t.text for t in after if not t.is_tag), "")
    # The letter a combining mark (a dakuten written apart) belongs to.
    a = next((c for c in reversed(last) if not is_mark(c)), "")
    b = first[:1]
    if after[0].is_tag:
        return bool(a) and is_cjk(a)
    if before[-1].is_tag:
        return bool(b) and is_cjk(b)
    return bool(a and b) and ((is_cjk(a) and is_cjk(b)) or _cjk_punct(a) or _cjk_punct(b))


def seam(before: str, after: str) -> str:
    """What goes between two texts written one after the other, as a
    stream's finals are: ``""`` where the seam falls inside text written
    without spaces, else ``" "``.

    No space where the characters on both sides are CJK (:func:`.chars.is_cjk`:
    Chinese, Japanese, ``你好。`` then ``我很好。``), or where either is
    CJK punctuation (``。、「」``, which carries its own spacing: ``好。OK``).
    A space elsewhere: Latin text, Korean (written with spaces), Thai (its
    phrases spaced), a CJK character beside a Latin word (``用了 Python``).
    A tag at the seam is written as tags are inside Chinese and Japanese
    text, glued (``你好[laughs]世界``): with no space where the text on the
    seam's other side, tags looked past, ends (or starts) with a CJK
    character, and a space elsewhere. ``" "`` when either text has nothing
    but whitespace or hidden characters."""
    return _seam(tokenize(before), tokenize(after))


def _seam(before: Sequence[Token], after: Sequence[Token]) -> str:
    return "" if before and after and _unspaced(before, after) else " "


def seams(texts: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Each non-empty text of ``texts`` with what goes before it: ``""``
    before the first, then :func:`seam` of the texts before it and it.
    The seam looks past texts of nothing but tags to the last that holds
    text, as it looks past tags inside one: ``你好``, ``[laughs]``,
    ``[sighs]``, ``世界`` is ``你好[laughs][sighs]世界``."""
    # The tokens the next seam reads; and those of the last text that holds
    # any: tags alone (or a space) before a seam would take it as between
    # Latin words.
    before: Sequence[Token] | None = None
    anchor: Sequence[Token] = ()
    for text in texts:
        if not text:
            continue
        tokens = tokenize(text)
        yield ("" if before is None else _seam(before, tokens)), text
        if any(not t.is_tag for t in tokens):
            anchor = before = tokens
        elif tokens or before is None:
            # The anchor and this text's tags tell the next seam all that
            # the whole run would (a seam reads the last text and whether a
            # tag ends it), in bounded time however long the run. A text
            # of nothing shown (spaces) changes no seam.
            before = (*anchor, *tokens)


def join_texts(texts: Iterable[str]) -> str:
    """The non-empty ``texts`` one after the other, each :func:`seam` between
    (:func:`seams`)."""
    return "".join(between + text for between, text in seams(texts))


def tag_word_indexes(tokens: Sequence[Token]) -> list[int]:
    """For each tag of ``tokens``, in order, the index of the plain-text word
    it comes before: how many words of ``render(tokens, tags=False)`` (as
    :func:`tokenize` splits it) end before the tag's place there. A tag
    inside a word of the plain text (``hel[laughs]lo`` is ``hello``, and
    ``你好[laughs]世界`` one run of Chinese) indexes that word."""
    plain, places = _render(tokens, False)
    words, ends = _tokenize(plain)
    word_ends = [e for w, e in zip(words, ends, strict=True) if w.is_word]
    return [bisect_right(word_ends, at) for at in places]


def normalize(text: str) -> str:
    """Tagged text with canonical tags and single spaces."""
    return render(tokenize(text))


def plain_text(tagged: str) -> str:
    """The text with its tags removed (CAPS and punctuation kept)."""
    return render(tokenize(tagged), tags=False)


def word_count(tokens: Iterable[Token]) -> int:
    return sum(1 for t in tokens if t.is_word)


@dataclass(frozen=True)
class Carry:
    """The emotion and delivery tags in effect at a point of the text.

    A tag in effect needs no repeating: :meth:`holds` tells whether a tag
    token would only restate it. :meth:`advance` moves past a token: a
    carrying tag replaces the one of its kind; sentence-ending punctuation
    clears both (the style of the Evoxtral scripts: a new sentence re-tags).
    """

    emotion: str | None = None
    delivery: str | None = None

    def holds(self, tok: Token) -> bool:
        if tok.tag_kind is TagKind.EMOTION:
            return tok.tag == self.emotion
        if tok.tag_kind is TagKind.DELIVERY:
            return tok.tag == self.delivery
        return False

    def advance(self, tok: Token) -> Carry:
        if tok.tag_kind is TagKind.EMOTION and tok.tag != self.emotion:
            return Carry(tok.tag, self.delivery)
        if tok.tag_kind is TagKind.DELIVERY and tok.tag != self.delivery:
            return Carry(self.emotion, tok.tag)
        if tok.ends_sentence and (self.emotion or self.delivery):
            return Carry()
        return self

    def advance_all(self, tokens: Iterable[Token]) -> Carry:
        state = self
        for tok in tokens:
            state = state.advance(tok)
        return state
