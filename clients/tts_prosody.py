"""Tags -> prosody for the offline espeak-ng synthesiser of ``tts_bridge.py``. Pure.

:func:`plan_speech` maps a final's inline tags onto spoken spans and pauses:
``[whispers]`` -> the ``+whisper`` voice variant, ``[excited]`` -> faster and
higher, ``[sad]`` -> slower and lower, ``[calm]`` -> slower,
``[angry]``/``[shouts]`` -> louder (emotion and delivery tags hold until the
sentence ends or a tag of the same kind replaces them); ``[pause]`` and its
kin -> a break, any non-verbal tag (``[laughs]``, ``[sighs]``, ...) -> a short
break; other tags are dropped (tables: :data:`EMOTION_PROSODY`,
:data:`DELIVERY_PROSODY`, :data:`PAUSE_MS`, :data:`NONVERBAL_PAUSE_MS`).
Bracketed text holding a digit (``[2]``, ``[1990s]``) is no tag to the
tokenizer but text, read out like any (:func:`elevenlabs_text` gives
ElevenLabs v3 the same text without its brackets).
:func:`to_ssml` writes SSML for ``espeak-ng -m`` (a break after punctuation
adds to the punctuation's own pause, and punctuation before a tag keeps its
pause); :func:`edge_pauses` splits off the
pauses at the very start and end, which espeak-ng trims.
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from xml.sax.saxutils import escape, quoteattr

from evoxtral_stream.text.tags import Carry, TagKind, Token, TokenKind, render, tokenize

__all__ = [
    "CLAUSE_MARK",
    "DELIVERY_PROSODY",
    "EMOTION_PROSODY",
    "NONVERBAL_PAUSE_MS",
    "PAUSE_MS",
    "Pause",
    "Prosody",
    "Speak",
    "SpeechItem",
    "edge_pauses",
    "elevenlabs_text",
    "plan_speech",
    "to_ssml",
    "whisper_voice",
]


@dataclass(frozen=True)
class Prosody:
    """How a span is spoken: ``rate`` in percent of the voice's rate,
    ``pitch`` and ``volume`` as percent changes, the whisper variant, and
    SSML ``<emphasis>`` (words written in capitals, :func:`plan_speech`)."""

    rate: int = 100
    pitch: int = 0
    volume: int = 0
    whisper: bool = False
    emphasis: bool = False

    @property
    def neutral(self) -> bool:
        return self == Prosody()

    def combine(self, other: Prosody) -> Prosody:
        """Both at once: rates multiply, pitch and volume changes add."""
        return Prosody(rate=round(self.rate * other.rate / 100),
                       pitch=self.pitch + other.pitch,
                       volume=self.volume + other.volume,
                       whisper=self.whisper or other.whisper,
                       emphasis=self.emphasis or other.emphasis)


@dataclass(frozen=True)
class Speak:
    """Words (tags removed, punctuation kept) spoken with one prosody."""

    text: str
    prosody: Prosody = Prosody()


@dataclass(frozen=True)
class Pause:
    """Silence of ``ms`` milliseconds, standing for tag ``tag``."""

    ms: int
    tag: str


SpeechItem = Speak | Pause

#: Emotion tags that change prosody; other emotions are ignored.
EMOTION_PROSODY: Mapping[str, Prosody] = types.MappingProxyType({
    "excited": Prosody(rate=125, pitch=25),
    "sad": Prosody(rate=80, pitch=-20),
    "angry": Prosody(volume=60),
    "calm": Prosody(rate=85),
})
#: Delivery tags that change prosody; other deliveries are ignored.
DELIVERY_PROSODY: Mapping[str, Prosody] = types.MappingProxyType({
    "whispers": Prosody(whisper=True),
    "shouts": Prosody(volume=80),
})
#: Pause tags and their silence in ms.
PAUSE_MS: Mapping[str, int] = types.MappingProxyType({
    "pause": 500,
    "short pause": 250,
    "long pause": 1000,
    "continues after a beat": 400,
    "hesitates": 300,
})
#: The short pause that stands for any non-verbal sound (laughs, sighs, ...).
NONVERBAL_PAUSE_MS = 200


def _style(carry: Carry) -> Prosody:
    style = Prosody()
    if carry.emotion is not None:
        style = style.combine(EMOTION_PROSODY.get(carry.emotion, Prosody()))
    if carry.delivery is not None:
        style = style.combine(DELIVERY_PROSODY.get(carry.delivery, Prosody()))
    return style


# Brackets (fullwidth ones too: the tokenizer's) and asterisks: of a
# malformed tag, or around a number ("[2]", which the tokenizer leaves as text).
_STRAY_MARKS = frozenset("[]［］()*")


def _unspoken(c: str) -> bool:
    """A stray tag mark, or a bad byte's stand-in: U+FFFD, which the
    tokenizer (and the server) writes for a lone surrogate (a broken
    decoder's stand-in for one, no character), and which espeak-ng would
    read out by its name; a surrogate itself too."""
    return c in _STRAY_MARKS or c == "\ufffd" or "\ud800" <= c <= "\udfff"


def _in_capitals(word: str) -> bool:
    """Two or more letters, all capitals (``YES``, ``DON'T``; not ``I``, ``McDONALD``)."""
    return word.isupper() and sum(c.isalpha() for c in word) >= 2


# A bracketed span as the tokenizer's own: no bracket inside.
_BRACKETED = re.compile(r"[\[［][^\[\]［］]*[\]］]")


def elevenlabs_text(tagged: str) -> str:
    """``tagged`` as ElevenLabs v3 is given it. Pure.

    v3 takes any bracketed text as a direction for the voice, not words to
    say, so brackets that hold words yet make no tag to the tokenizer
    (they hold a digit: ``[2]``, ``[1990s]``) go, with a space where one
    met a word (``page[12].`` -> ``page 12.``), as :func:`plan_speech`
    reads it, and brackets that then hold a digit too (``[a[2]b]`` ->
    ``a 2 b``); a tag inside is written as v3's (``[(laughs) 3]`` ->
    ``[laughs] 3``). Everything else is left as it is: tags, their
    variants, bracketed words (``[sic]``, ``[INAUDIBLE]``, a sound
    description), which v3 takes as a direction, and empty brackets.
    """
    while True:  # until nothing changes (a round takes a pair of brackets away)
        sent = _unbracket_once(tagged)
        if sent == tagged:
            return sent
        tagged = sent


def _unbracket_once(tagged: str) -> str:
    """:func:`elevenlabs_text`'s one round: the brackets of text found now.
    Brackets around one left out (``[a[2]b]``) may hold a digit themselves
    after it: the next round takes them."""
    out: list[str] = []
    pos = 0
    for m in _BRACKETED.finditer(tagged):
        toks = tokenize(m.group())
        if toks[0].is_tag or not any(t.is_word for t in toks):
            continue  # a tag (a direction), or empty brackets
        out.append(tagged[pos:m.start()])
        said = render(tokenize(m.group()[1:-1]))
        # A space where the bracket kept two words apart (page[12], [2][3], x&[2]).
        if _glued("".join(out), said):
            out.append(" ")
        out.append(said)
        if _glued(said, tagged[m.end():]):
            out.append(" ")
        pos = m.end()
    out.append(tagged[pos:])
    return "".join(out)


def _glued(left: str, right: str) -> bool:
    """Whether ``left + right`` reads as fewer tokens than the two apart:
    a word (or punctuation) across the join."""
    return bool(left and right) and (
        len(tokenize(left + right)) < len(tokenize(left)) + len(tokenize(right)))


def plan_speech(tagged: str) -> tuple[SpeechItem, ...]:
    """What espeak-ng should say for ``tagged`` text: spans and pauses. Pure.

    Emotion and delivery tags set the prosody of the words after them until
    a tag of the same kind replaces them or the sentence ends (the
    :class:`~evoxtral_stream.text.tags.Carry` rule); both apply together.
    Pause tags become :data:`PAUSE_MS` silences, non-verbal tags a
    :data:`NONVERBAL_PAUSE_MS` one; unknown and unmapped tags are dropped.
    Bracketed text holding a digit (``[2]``) is no tag: its words are read
    out, its brackets are not, as any stray bracket.
    Consecutive words of one prosody form one :class:`Speak`; a span of
    punctuation alone is dropped. Control characters, espeak-ng markup (NUL
    ends its input), are whitespace to the tokenizer; lone surrogates (U+FFFD
    once tokenized) and U+FFFD are left out like stray brackets (a space),
    so the plan always encodes and no bad byte is read out. Variants
    (``(laughs)``, ``[WHISPERING]``) count as their canonical tag.

    A word in capitals (two or more letters, none in lower case: ``YES``,
    ``DON'T``) is emphasis, as for ElevenLabs v3: it is said in lower case
    with :attr:`Prosody.emphasis` (espeak-ng spells many words in capitals
    out, ``YES`` as "Y E S"), and the punctuation right after it with it.
    Acronyms that cannot be said as a word (``FBI``) espeak-ng still spells.
    """
    items: list[SpeechItem] = []
    run: list[Token] = []
    run_style = Prosody()

    def flush() -> None:
        if any(t.is_word for t in run):
            items.append(Speak(render(run), run_style))
        run.clear()

    carry = Carry()
    # A tag left out keeps its space before the next word, as
    # render(tags=False) does ("so [nervous]I" -> "so I"); a bracket left out
    # is a space (espeak-ng pauses there): "me (maybe)" must not become "memaybe".
    space = False
    for tok in tokenize(tagged):
        after = False  # a bracket left out at the end of this token
        if tok.is_tag:
            assert tok.tag is not None
            if tok.tag_kind is TagKind.PAUSE:
                flush()
                items.append(Pause(PAUSE_MS.get(tok.tag, PAUSE_MS["pause"]), tok.tag))
            elif tok.tag_kind is TagKind.NONVERBAL:
                flush()
                items.append(Pause(NONVERBAL_PAUSE_MS, tok.tag))
            carry = carry.advance(tok)
            space = space or tok.space_before
            continue
        if tok.is_punct:
            # Brackets and asterisks left over from a malformed tag are not
            # spoken (espeak-ng says "asterisk"), and re-read later they
            # could open a tag that swallows a word.
            marks = "".join(c for c in tok.text if not _unspoken(c))
            if not marks:
                space = True
                continue
            if marks != tok.text:
                after = True
                tok = Token(TokenKind.PUNCT, marks, space_before=tok.space_before)
            style = replace(_style(carry), emphasis=run_style.emphasis)
        else:
            style = _style(carry)
            if _in_capitals(tok.text):
                tok = Token(TokenKind.WORD, tok.text.lower(), space_before=tok.space_before)
                style = replace(style, emphasis=True)
        if tok.is_punct:
            # A space not given yet waits for the next word: "[2]&x" said
            # "2&x" is one word, "(maybe)." said "maybe ." pauses before the
            # full stop.
            space = after or (space and not tok.space_before)
        else:
            if space and not tok.space_before:
                tok = tok.with_space(True)
            space = False
        if style != run_style:
            flush()
            run_style = style
        run.append(tok)
        carry = carry.advance(tok)
    flush()
    return tuple(items)


def whisper_voice(voice: str) -> str:
    """The whisper variant of an espeak-ng voice (``en-us+f3`` -> ``en-us+whisper``)."""
    return voice.split("+", 1)[0] + "+whisper"


def _prosody_attrs(p: Prosody) -> str:
    attrs: list[str] = []
    if p.rate != 100:
        attrs.append(f'rate="{p.rate}%"')
    if p.pitch:
        attrs.append(f'pitch="{p.pitch:+d}%"')
    if p.volume:
        attrs.append(f'volume="{p.volume:+d}%"')
    return " ".join(attrs)


#: Put after a span's last punctuation when more follows it, and before a
#: ``<break>`` that follows speech (:func:`to_ssml`): a zero-width space, which
#: espeak-ng says nothing for, as an XML character reference.
CLAUSE_MARK = "&#8203;"


def _ends_in_punctuation(text: str) -> bool:
    """Whether ``text``'s last token is punctuation (``quiet.``, ``"secret"``)."""
    toks = tokenize(text)
    return bool(toks) and toks[-1].is_punct


def to_ssml(items: Sequence[SpeechItem], voice: str = "en") -> str:
    """SSML for ``espeak-ng -m``: ``<prosody rate= pitch= volume=>`` around
    styled spans, ``<emphasis>`` inside it around emphasised ones,
    ``<voice name="{voice}+whisper">`` around whispered ones,
    and one ``<break time="Nms"/>`` per run of pauses (summed), inside the
    markup of the span before it. :data:`CLAUSE_MARK` ends a span, inside
    its markup, before such a break and after its last punctuation when
    more follows, so that the punctuation keeps its own pause and a break
    adds to it. Text is XML-escaped. Pure."""
    lead_ms = 0  # pauses before any speech
    spans: list[tuple[Speak, int]] = []  # each span and the pauses after it
    for item in items:
        if isinstance(item, Speak):
            spans.append((item, 0))
        elif spans:
            spans[-1] = (spans[-1][0], spans[-1][1] + item.ms)
        else:
            lead_ms += item.ms
    parts: list[str] = []
    for i, (span, pause_ms) in enumerate(spans):
        body = escape(span.text)
        # espeak-ng takes a full stop before a tag as a sentence end only once
        # an upper-case letter follows the tag, and a <voice> tag (opened or
        # closed) or a <break> ends the clause first: the full stop's pause
        # was lost ("[whispers] Be quiet. Then go." ran on, 0.05 s of silence
        # where the text alone has 0.31 s; "Be quiet. NO way." too, "no"
        # said in lower case), and a break was heard instead of it, not after
        # it. A character it does not say, inside the span's markup, ends
        # that clause first, with its own pause. After a word alone it
        # changes nothing.
        if pause_ms or (i + 1 < len(spans) and _ends_in_punctuation(span.text)):
            body += " " + CLAUSE_MARK
        if pause_ms:
            # Inside the span too: espeak-ng scales a break by the rate in
            # effect where it reads it; after the span's close, an
            # [excited] span's break came out 0.28 s too long.
            body += f'<break time="{pause_ms}ms"/>'
        if span.prosody.emphasis:
            body = f"<emphasis>{body}</emphasis>"
        attrs = _prosody_attrs(span.prosody)
        if attrs:
            body = f"<prosody {attrs}>{body}</prosody>"
        if span.prosody.whisper:
            body = f"<voice name={quoteattr(whisper_voice(voice))}>{body}</voice>"
        parts.append(body)
    if lead_ms:
        parts.insert(0, f'<break time="{lead_ms}ms"/>')
    return "<speak>" + " ".join(parts) + "</speak>"


def edge_pauses(items: Sequence[SpeechItem]) -> tuple[int, tuple[SpeechItem, ...], int]:
    """``(lead_ms, middle, trail_ms)``: the pauses before the first and after
    the last :class:`Speak`, summed, and the items between. Without any
    :class:`Speak`, every pause counts as lead. Pure."""
    speaks = [i for i, item in enumerate(items) if isinstance(item, Speak)]
    if not speaks:
        return sum(item.ms for item in items if isinstance(item, Pause)), (), 0
    first, last = speaks[0], speaks[-1]
    lead = sum(item.ms for item in items[:first] if isinstance(item, Pause))
    trail = sum(item.ms for item in items[last + 1:] if isinstance(item, Pause))
    return lead, tuple(items[first:last + 1]), trail


