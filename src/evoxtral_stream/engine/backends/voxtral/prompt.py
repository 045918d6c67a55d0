"""Transcription prompt ids, built directly instead of through a WAV round-trip.

``VoxtralProcessor.apply_transcription_request`` writes each array to an
in-memory WAV, decodes it again and asks mistral-common for the tokens. The
result only depends on the audio length, so :class:`PromptSpec` builds the
same ids from the sample count::

    <s> [INST] [BEGIN_AUDIO] [AUDIO] x 375 per 30 s window [/INST] lang:en [TRANSCRIBE]

Pure Python: no torch here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["LANGUAGES", "SPECIAL_TOKENS", "PromptSpec", "Tokenizer", "language_ids"]

#: The languages Voxtral-Mini-3B-2507 transcribes (its model card), and
#: "auto": no ``lang:xx`` in the prompt, the model detects the language.
LANGUAGES = ("auto", "de", "en", "es", "fr", "hi", "it", "nl", "pt")

# The control tokens the prompt needs, with the ids the published Voxtral
# tokenizer gives them; PromptSpec reads the ids from the tokenizer itself.
SPECIAL_TOKENS = {
    "bos": ("<s>", 1),
    "eos": ("</s>", 2),
    "inst": ("[INST]", 3),
    "end_inst": ("[/INST]", 4),
    "pad": ("<pad>", 11),
    "audio": ("[AUDIO]", 24),
    "begin_audio": ("[BEGIN_AUDIO]", 25),
    "transcribe": ("[TRANSCRIBE]", 34),
}


class Tokenizer(Protocol):
    """The part of mistral-common's ``Tekkenizer`` used here."""

    @property
    def audio(self) -> Any: ...

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]: ...

    def get_special_token(self, s: str) -> int: ...


@dataclass(frozen=True)
class PromptSpec:
    """Token ids and audio geometry of a transcription prompt.

    ``language`` ids are the tokens of ``lang:xx`` (empty: let the model
    detect the language). A window is ``samples_per_window`` samples of
    16 kHz audio, encoded as ``tokens_per_window`` ``[AUDIO]`` tokens.
    """

    bos: int
    eos: int
    inst: int
    end_inst: int
    pad: int
    audio: int
    begin_audio: int
    transcribe: int
    language: tuple[int, ...]
    sampling_rate: int
    samples_per_window: int
    frames_per_window: int
    tokens_per_window: int
    num_mel_bins: int
    n_fft: int
    hop_length: int

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer, language: str) -> PromptSpec:
        """Read ids and audio geometry from a Tekken tokenizer with an audio block.

        ``language`` is one of :data:`LANGUAGES`, or "" for detection.
        Raises ValueError when the tokenizer has no audio config or the
        language is not one of :data:`LANGUAGES`.
        """
        audio = tok.audio
        if audio is None or audio.chunk_length_s is None:
            raise ValueError("the tokenizer (tekken.json) has no audio block with chunk_length_s")
        ids = {key: tok.get_special_token(text) for key, (text, _) in SPECIAL_TOKENS.items()}
        enc = audio.encoding_config
        samples = int(audio.chunk_length_s * audio.sampling_rate)
        frames = samples // enc.hop_length
        # mistral-common's count for a padded window: frames / (samples per
        # token / hop), rounded up (AudioEncoder._encode_audio_tokens).
        per_tok = int(float(int(audio.sampling_rate // audio.frame_rate)) / enc.hop_length)
        return cls(
            language=language_ids(tok, language),
            sampling_rate=int(audio.sampling_rate),
            samples_per_window=samples,
            frames_per_window=frames,
            tokens_per_window=math.ceil(frames / per_tok),
            num_mel_bins=int(enc.num_mel_bins),
            n_fft=int(enc.window_size),
            hop_length=int(enc.hop_length),
            **ids,
        )

    def windows(self, n_samples: int) -> int:
        """Number of 30 s windows for ``n_samples`` samples (at least one)."""
        return max(1, math.ceil(n_samples / self.samples_per_window))

    def ids(self, n_samples: int, language: Sequence[int] | None = None) -> list[int]:
        """The prompt for ``n_samples`` samples of audio, in ``language`` (the
        ids of its ``lang:xx``; None: :attr:`language`, empty: detect)."""
        n_audio = self.windows(n_samples) * self.tokens_per_window
        return [
            self.bos,
            self.inst,
            self.begin_audio,
            *([self.audio] * n_audio),
            self.end_inst,
            *(self.language if language is None else language),
            self.transcribe,
        ]

    def left_padded(
        self,
        lengths: Sequence[int],
        suffixes: Sequence[Sequence[int]] | None = None,
        languages: Sequence[Sequence[int] | None] | None = None,
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Prompts for audio of ``lengths`` samples, left-padded to one length.

        ``suffixes`` (one per row) are appended after each prompt: the tokens
        of a committed prefix the model continues from. ``languages`` (one
        per row) are as in :meth:`ids`. Returns (ids, attention masks), one
        row per length.
        """
        tails = suffixes if suffixes is not None else [()] * len(lengths)
        langs = languages if languages is not None else [None] * len(lengths)
        rows = [self.ids(n, lang) + list(t)
                for n, t, lang in zip(lengths, tails, langs, strict=True)]
        width = max(len(r) for r in rows)
        ids = [[self.pad] * (width - len(r)) + r for r in rows]
        masks = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        return ids, masks


def language_ids(tok: Tokenizer, language: str) -> tuple[int, ...]:
    """The ids of ``lang:xx`` for ``language`` (one of :data:`LANGUAGES`);
    none for "auto" or "". Raises ValueError for any other code."""
    lang = language.strip().lower()
    if lang in ("", "auto"):
        return ()
    if lang not in LANGUAGES:
        raise ValueError(f"Voxtral does not transcribe language {language!r} "
                         f"(it knows {', '.join(LANGUAGES)})")
    return tuple(tok.encode(f"lang:{lang}", False, False))
