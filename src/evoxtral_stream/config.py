"""Typed configuration: the packaged ``config.toml`` holds every default.

Loading order: packaged defaults, then an optional user file (``--config`` or
``$EVOXTRAL_CONFIG``, which may set only some keys), then overrides given as
dotted keys (``vad.aggressiveness=3``). Every value is checked against the
constraint declared on its field; a violation raises :class:`ConfigError`
whose message names the key, the value and what is allowed.

The dataclasses below declare types and constraints only. Their values come
from the TOML file, so there is no second copy of the defaults to drift.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "CONFIG_ENV",
    "STALL_TIMEOUT_BLOCKS",
    "AudioConfig",
    "AuthConfig",
    "AuthTokenConfig",
    "CaptionsConfig",
    "Config",
    "ConfigError",
    "JournalConfig",
    "LoggingConfig",
    "ModelConfig",
    "MqttConfig",
    "ServerConfig",
    "StreamConfig",
    "VadConfig",
    "VoxtralConfig",
    "WhisperConfig",
    "WorkerConfig",
    "load_config",
    "parse_override",
    "redact_host",
    "to_toml",
]

CONFIG_ENV = "EVOXTRAL_CONFIG"
#: The shortest ``audio.stall_timeout_s``, in blocks of ``audio.block_ms``:
#: a working device calls back once a block (0.1 s, the key's floor, at the
#: default 20 ms), so a shorter check takes every pause between two blocks
#: for a lost device.
STALL_TIMEOUT_BLOCKS = 5
#: The highest ``audio.channels`` number (interfaces with MADI or Dante
#: inputs reach 64 to 128 channels).
MAX_AUDIO_CHANNEL = 256


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message is for people."""


def _range(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"range": (lo, hi)}


def _off_or(least: float, hi: float) -> dict[str, Any]:
    """Seconds of a limit that 0 turns off, and any other value at least
    ``least``: below it the limit trips on ordinary work (a model call of a
    few ms, a packet the network sends again, a moment of load), or is
    shorter than the engine's own timers (at most every 0.05 s) measure."""
    return {"range": (0.0, hi), "least": least}


def _choices(*values: object) -> dict[str, Any]:
    return {"choices": values}


@dataclass(frozen=True)
class AudioConfig:
    device: str = field(metadata={"index": True})  # a name or a PortAudio index
    block_ms: int = field(metadata=_range(5, 200))
    max_pending_blocks: int = field(metadata=_range(1, 10_000))
    file_chunk_ms: int = field(metadata=_range(10, 10_000))
    stall_timeout_s: float = field(metadata=_off_or(0.1, 3600.0))
    reopen_interval_s: float = field(metadata=_range(0.1, 3600.0))
    channels: tuple[int, ...]
    split_channels: bool

    def __post_init__(self) -> None:
        bad = [c for c in self.channels if not 1 <= c <= MAX_AUDIO_CHANNEL]
        if bad or len(set(self.channels)) != len(self.channels):
            raise ConfigError("audio.channels must be distinct channel numbers "
                              f"1..{MAX_AUDIO_CHANNEL} (1 is the first), got "
                              f"{list(self.channels)}")
        if self.split_channels and not self.channels:
            raise ConfigError("audio.split_channels needs audio.channels: the channels to "
                              "caption, one stream each (e.g. [1, 2, 3])")
        least = STALL_TIMEOUT_BLOCKS * self.block_ms / 1000
        if 0 < self.stall_timeout_s < least:
            raise ConfigError(f"audio.stall_timeout_s must be 0 (off) or at least "
                              f"{STALL_TIMEOUT_BLOCKS} blocks of audio.block_ms ({least:g} s), "
                              f"got {self.stall_timeout_s}")


@dataclass(frozen=True)
class VadConfig:
    aggressiveness: int = field(metadata=_range(0, 3))
    frame_ms: int = field(metadata=_choices(10, 20, 30))
    start_window_ms: int = field(metadata=_range(10, 2000))
    start_ratio: float = field(metadata=_range(0.0, 1.0))
    end_silence_ms: int = field(metadata=_range(30, 10_000))
    end_tail_ms: int = field(metadata=_range(0, 2000))
    pre_roll_ms: int = field(metadata=_range(0, 2000))
    min_speech_ms: int = field(metadata=_range(0, 10_000))
    max_segment_s: float = field(metadata=_range(2.0, 29.0))
    split_search_s: float = field(metadata=_range(0.1, 10.0))

    def __post_init__(self) -> None:
        if self.split_search_s >= self.max_segment_s:
            raise ConfigError(
                f"vad.split_search_s must be below vad.max_segment_s ({self.max_segment_s}), "
                f"got {self.split_search_s}"
            )


@dataclass(frozen=True)
class StreamConfig:
    partial_interval_ms: int = field(metadata=_range(0, 60_000))
    min_partial_ms: int = field(metadata=_range(0, 30_000))
    final_replaces_stable: bool
    prefix_reuse: str = field(metadata=_choices("off", "partials", "all"))
    draft: bool
    pause_partial: bool


@dataclass(frozen=True)
class WorkerConfig:
    max_queue: int = field(metadata=_range(1, 100_000))
    batching: str = field(metadata=_choices("continuous", "batch"))
    max_batch: int = field(metadata=_range(1, 1024))
    max_wait_ms: int = field(metadata=_range(0, 1000))
    restart_limit: int = field(metadata=_range(0, 1000))
    restart_backoff_s: float = field(metadata=_range(0.0, 600.0))
    stall_timeout_s: float = field(metadata=_off_or(0.1, 86400.0))
    drain_timeout_s: float = field(metadata=_range(0.0, 86400.0))


@dataclass(frozen=True)
class WhisperConfig:
    model_path: str
    compute_type: str = field(metadata=_choices("int8", "int8_float32", "float32"))
    cpu_threads: int = field(metadata=_range(0, 256))
    beam_size: int = field(metadata=_range(1, 16))
    min_window_s: float = field(metadata=_range(1.0, 30.0))
    keep_non_speech: bool
    no_speech_threshold: float = field(metadata=_range(0.0, 1.0))
    log_prob_threshold: float = field(metadata=_range(-50.0, 0.0))


@dataclass(frozen=True)
class VoxtralConfig:
    base: str
    adapter: str
    merge_lora: bool
    device: str
    dtype: str = field(metadata=_choices("auto", "bfloat16", "float16", "float32"))
    tokens_per_second: float = field(metadata=_range(0.5, 100.0))
    min_new_tokens: int = field(metadata=_range(1, 4096))
    attn_implementation: str = field(metadata=_choices("sdpa", "eager", "flash_attention_2"))
    static_cache: bool
    lookahead: bool
    step_graphs: str = field(metadata=_choices("shared", "per_bucket"))
    encoder_graphs: bool
    encoder_compile: bool
    prefill_graphs: bool
    compile_cache_dir: str
    adapters: dict[str, str]

    def __post_init__(self) -> None:
        # (key set, key it needs, the value it needs, why)
        needs = [
            ("lookahead", "static_cache", True,
             "it launches the slot cache's decode steps ahead"),
            ("encoder_graphs", "merge_lora", True, "a captured encoder cannot switch adapters"),
            ("encoder_compile", "merge_lora", True,
             "a compiled encoder would compile again for every adapter"),
            ("prefill_graphs", "encoder_graphs", True,
             "the fixed-shape prefill takes the prompts' embeddings"),
            ("adapters", "merge_lora", False, "adapters cannot be switched once merged"),
        ]
        for key, other, value, why in needs:
            if getattr(self, key) and getattr(self, other) != value:
                raise ConfigError(f"model.voxtral.{key} needs model.voxtral.{other} = "
                                  f"{str(value).lower()} ({why})")
        # An empty path is the working folder to pathlib: a blank base would
        # load whatever checkpoint lies there. (Extra adapters: see _build.)
        if not self.base.strip():
            raise ConfigError("model.voxtral.base is empty; set it to a hub id or a local folder")
        d = self.device
        ok = d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())
        if not ok:
            raise ConfigError(
                f"model.voxtral.device must be auto, cpu, cuda or cuda:N, got {d!r}"
            )


@dataclass(frozen=True)
class ModelConfig:
    backend: str = field(metadata=_choices("auto", "voxtral", "whisper"))
    language: str
    whisper: WhisperConfig
    voxtral: VoxtralConfig


@dataclass(frozen=True)
class CaptionsConfig:
    """Subtitle files written by ``transcribe --srt/--vtt``."""

    srt_tags: str = field(metadata=_choices("inline", "strip"))
    vtt_tags: str = field(metadata=_choices("inline", "strip", "class"))
    max_line_chars: int = field(metadata=_range(10, 200))
    max_lines: int = field(metadata=_range(1, 5))
    max_cue_s: float = field(metadata=_range(1.0, 30.0))
    min_cue_s: float = field(metadata=_range(0.0, 10.0))

    def __post_init__(self) -> None:
        if self.min_cue_s > self.max_cue_s:
            raise ConfigError(
                f"captions.min_cue_s must be at most captions.max_cue_s "
                f"({self.max_cue_s}), got {self.min_cue_s}"
            )


@dataclass(frozen=True)
class ServerConfig:
    host: str
    port: int = field(metadata=_range(0, 65535))
    subscriber_queue: int = field(metadata=_range(1, 1_000_000))
    max_message_bytes: int = field(metadata=_range(1024, 1 << 30))
    history: int = field(metadata=_range(0, 1_000_000))
    history_streams: int = field(metadata=_range(1, 100_000))
    resume_window: int = field(metadata=_range(1, 1_000_000))
    handshake_timeout_s: float = field(metadata=_range(0.1, 3600.0))
    allow_anonymous: bool
    allowed_origins: tuple[str, ...]
    tls_cert: str
    tls_key: str
    max_streams: int = field(metadata=_range(1, 1_000_000))
    max_ingest_speed: float = field(metadata=_range(0.0, 1000.0))
    # A message of more audio than the burst is always too fast: at 0 every one was.
    ingest_burst_s: float = field(metadata=_range(0.5, 86400.0))
    idle_timeout_s: float = field(metadata=_off_or(1.0, 86400.0))
    ping_interval_s: float = field(metadata=_range(0.0, 3600.0))
    ping_timeout_s: float = field(metadata=_off_or(1.0, 3600.0))
    shutdown_flush_s: float = field(metadata=_range(0.0, 300.0))


@dataclass(frozen=True)
class Config:
    # In config.toml's order of sections, which to_toml prints them in.
    audio: AudioConfig
    vad: VadConfig
    stream: StreamConfig
    worker: WorkerConfig
    model: ModelConfig
    server: ServerConfig
    captions: CaptionsConfig
    auth: AuthConfig
    mqtt: MqttConfig
    journal: JournalConfig
    logging: LoggingConfig


T = TypeVar("T")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = f.read()
        # Windows editors start UTF-8 files with a BOM, which tomllib takes
        # for a statement ("Invalid statement (at line 1, column 1)").
        return tomllib.loads(data.removeprefix(codecs.BOM_UTF8).decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except RecursionError:
        # tomllib reads nested arrays and inline tables by recursion.
        raise ConfigError(f"config file {path} is not valid TOML: {_TOO_DEEP}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text ({e.reason} at byte "
                          f"{e.start})") from None


_TOO_DEEP = "values nested too deeply (arrays or inline tables thousands deep)"


def _defaults() -> dict[str, Any]:
    text = resources.files("evoxtral_stream").joinpath("config.toml").read_text("utf-8")
    return tomllib.loads(text)


# Tables whose keys are the user's own names (not a fixed schema).
_OPEN_TABLES = frozenset({"model.voxtral.adapters"})


def _merge(base: dict[str, Any], over: Mapping[str, Any], prefix: str = "") -> None:
    """Merge ``over`` into ``base`` in place, refusing keys ``base`` lacks."""
    for key, value in over.items():
        dotted = f"{prefix}{key}"
        if dotted in _OPEN_TABLES:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted} must be a table, got {_shown(dotted, value)}")
            base[key] = {**base.get(key, {}), **value}
            continue
        if key not in base:
            allowed = ", ".join(sorted(base))
            raise ConfigError(f"unknown config key {_key_shown(dotted)!r} "
                              f"(known here: {allowed})")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted} must be a table, got {_shown(dotted, value)}")
            _merge(base[key], value, dotted + ".")
        else:
            base[key] = value


def _type_name(tp: object) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(dotted: str, value: object, tp: object, meta: Mapping[str, Any]) -> object:
    if isinstance(value, _SetText):
        value = str(value) if tp is str else value.parsed
    if tp is str and isinstance(value, int | float) and not isinstance(value, bool):
        value = _number_as_text(dotted, value, meta)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        # TOML reads nan (and inf); every comparison with nan is false, so a
        # range check alone would let it through.
        raise ConfigError(f"{dotted} must be a finite number, got {_shown(dotted, value)}")
    ok = isinstance(value, tp) if isinstance(tp, type) else True
    if isinstance(value, bool) and tp in (int, float):
        ok = False
    if not ok:
        raise ConfigError(f"{dotted} must be {_type_name(tp)}, got {_shown(dotted, value)}")
    if "range" in meta:
        lo, hi = meta["range"]
        assert isinstance(value, (int, float))
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{dotted} must be {lo}..{hi}, got {_shown(dotted, value)}")
        least = meta.get("least")
        if least is not None and 0 < value < least:
            raise ConfigError(f"{dotted} must be 0 (off) or at least {least}, "
                              f"got {_shown(dotted, value)}")
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"{dotted} must be one of {allowed}, got {_shown(dotted, value)}")
    return value


def _build_array(dotted: str, value: object, tp: object) -> tuple[Any, ...]:
    """An array key: ``tuple[str, ...]`` or an array of tables (``[[a.b]]``)."""
    (item_tp, _) = typing.get_args(tp)
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{dotted} must be an array, got {_shown(dotted, value)}")
    if not (dataclasses.is_dataclass(item_tp) and isinstance(item_tp, type)):
        return tuple(_check_value(f"{dotted}[{i}]", v, item_tp, {}) for i, v in enumerate(value))
    out = []
    known = {f.name for f in fields(item_tp)}
    for i, item in enumerate(value):
        where = f"{dotted}[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where} must be a table, got {_shown(where, item)}")
        # Arrays of tables are not merged with defaults, so check names here.
        unknown = sorted(set(item) - known)
        if unknown:
            raise ConfigError(f"unknown config key {where}.{unknown[0]!r} "
                              f"(known here: {', '.join(sorted(known))})")
        try:
            out.append(_build(item_tp, item, where + "."))
        except ConfigError as e:
            # The entry's own checks say "auth.tokens hash ...": name the entry.
            text = str(e)
            if text.startswith(f"{dotted} "):
                raise ConfigError(f"{where}.{text.removeprefix(dotted + ' ')}") from None
            raise
    return tuple(out)


def _build(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type,unused-ignore]
        dotted = f"{prefix}{f.name}"
        if f.name not in data:
            # Entries of an array of tables may leave out keys that have a
            # documented default; the fixed sections take theirs from the TOML.
            if f.default is not dataclasses.MISSING:
                continue
            where = "" if prefix.endswith("].") else " from the defaults"
            raise ConfigError(f"config key {dotted!r} is missing{where}")
        tp = hints[f.name]
        value = data[f.name]
        if typing.get_origin(tp) is tuple:
            kwargs[f.name] = _build_array(dotted, value, tp)
        elif typing.get_origin(tp) is dict:
            if not isinstance(value, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()):
                raise ConfigError(f"{dotted} must be a table of name = \"text\", "
                                  f"got {_shown(dotted, value)}")
            kwargs[f.name] = dict(value)
        elif dataclasses.is_dataclass(tp) and isinstance(tp, type):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted} must be a table, got {_shown(dotted, value)}")
            kwargs[f.name] = _build(tp, value, dotted + ".")
        else:
            if isinstance(tp, types.UnionType):
                raise TypeError(f"unsupported config type for {dotted}")
            kwargs[f.name] = _check_value(dotted, value, tp, f.metadata)
    return cls(**kwargs)


# --- writing ----------------------------------------------------------------------

REDACTED = "<redacted>"
# Values that are secrets in their own right (token hashes are not).
_SECRET_KEYS = frozenset({"mqtt.password"})
# What no error quotes (array indices left out): the secrets, and token
# hashes too, as a bad one is most often the token itself pasted there.
_SECRET_IN_ERRORS = _SECRET_KEYS | {"auth.tokens.hash"}
_INDEX = re.compile(r"\[\d+\]")
# The kind of a value, in TOML's words, for an error that cannot show it.
_KINDS = ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "text"),
          (list, "an array"), (tuple, "an array"), (Mapping, "a table"))
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# What a dotted key (``--set``'s) is made of.
_KEY_CHARS = re.compile(r"[A-Za-z0-9_.-]*")
# Keys whose --set value may be a secret: one run into its key with the "="
# left out (``mqtt.passwordhunter2``) is all key characters, and one holding
# an "=" (a base64 password's padding) makes a key of what comes before it,
# so a key given longer than these is cut there (:func:`_key_shown`).
_SECRET_SET_KEYS = ("mqtt.password", "auth.tokens")


def _key_shown(dotted: str) -> str:
    """``dotted`` (a key as given) as an error quotes it: cut after
    ``mqtt.password`` or ``auth.tokens`` where more follows, the rest
    perhaps the value run into its key."""
    secret = next((k for k in _SECRET_SET_KEYS if dotted.startswith(k) and dotted != k), None)
    return dotted if secret is None else secret + REDACTED


def redact_host(host: str) -> str:
    """``host`` (``server.host``, ``mqtt.host``) as a message may quote it:
    the ``user:password@`` of a URL, or of a host given as one, read
    :data:`REDACTED` (all before the last ``@``)."""
    return re.sub(r"^(\w[\w+.-]*://)?.*@", rf"\g<1>{REDACTED}@", host, flags=re.DOTALL)


def _is_secret(dotted: str) -> bool:
    """Whether an error about ``dotted`` must not quote its value: a secret
    key, a key within one, or a table or array that may hold one (the
    value of ``auth.tokens``, or of one entry, may be a token)."""
    path = _INDEX.sub("", dotted)
    return any(path == s or s.startswith(path + ".") or path.startswith(s + ".")
               for s in _SECRET_IN_ERRORS)


def _shown(dotted: str, value: object) -> str:
    """``value`` of key ``dotted`` as an error quotes it: its repr, or for a
    secret (:func:`_is_secret`) :data:`REDACTED` and the kind of value it is."""
    if not _is_secret(dotted):
        return repr(value)
    if isinstance(value, _SetText):
        value = value.parsed  # ``--set auth.tokens=12`` gave a number, not text
    kind = next((name for tp, name in _KINDS if isinstance(value, tp)), type(value).__name__)
    return f"{REDACTED} ({kind})"


def _toml_string(text: str) -> str:
    """``text`` as a TOML basic string: JSON's, which has the same escapes,
    but for DEL, which JSON leaves raw and TOML refuses raw."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else _toml_string(name)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _toml_table(obj: object, name: str, out: list[str], header: str) -> None:
    scalars: list[str] = []
    later: list[tuple[str, object]] = []
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        dotted = f"{name}.{f.name}" if name else f.name
        if dataclasses.is_dataclass(value) or isinstance(value, dict) or (
                isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0])):
            later.append((dotted, value))
        else:
            shown = REDACTED if dotted in _SECRET_KEYS and value else value
            scalars.append(f"{_toml_key(f.name)} = {_toml_value(shown)}")
    if header and (scalars or not later):
        out += ["", header, *scalars]
    for dotted, value in later:
        if isinstance(value, dict):
            out += ["", f"[{dotted}]"]
            out += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()]
        elif isinstance(value, tuple):
            for item in value:
                _toml_table(item, dotted, out, f"[[{dotted}]]")
        else:
            _toml_table(value, dotted, out, f"[{dotted}]")


def _number_as_text(dotted: str, value: float, meta: Mapping[str, Any]) -> object:
    """A number where text is wanted: for a key with choices (``protocol =
    5``) or a device index (``device = 2``), its text (a float not among the
    choices is left for the type check); for free text refused, as TOML
    keeps no literal's text (``password = 0x1F`` would become ``"31"``)."""
    if str(value) in meta.get("choices", ()) or (
            isinstance(value, int) and ("choices" in meta or meta.get("index"))):
        return str(value)
    if "choices" in meta:
        return value
    got = "" if _is_secret(dotted) else f", got the number {value!r}"
    key = dotted.rsplit(".", 1)[-1]
    raise ConfigError(f'{dotted} must be text{got}: quote it: {key} = "..."')


def to_toml(cfg: Config) -> str:
    """``cfg`` as a complete config file (every key, in config.toml's order of
    sections) that :func:`load_config` reads back to an equal ``Config``,
    except that secrets (``mqtt.password``) read ``"<redacted>"``."""
    out: list[str] = ["# evoxtral-stream: the effective configuration"]
    _toml_table(cfg, "", out, "")
    return "\n".join(out) + "\n"


class _SetText(str):
    """A ``--set`` value that TOML reads as a number, boolean or date: a
    string key takes the text as written (``audio.device=2``,
    ``mqtt.password=0123``), any other key the TOML value, ``parsed``."""

    parsed: object


def parse_override(text: str) -> tuple[str, object]:
    """Parse ``section.key=value``; the value is a TOML literal or a bare string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    # Quoted only as far as it can be a key: the rest may be a value (a
    # password) whose key or "=" was left out.
    if not sep:
        head = _KEY_CHARS.match(text)
        shown = text if head is None or head.end() == len(text) else head.group() + REDACTED
        shown = _key_shown(shown)
        raise ConfigError(f"override {shown!r} has no '=': it must look like section.key=value")
    if not key:
        raise ConfigError(f"override '={REDACTED}' has no key: it must look like "
                          "section.key=value")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw
    except RecursionError:
        raise ConfigError(f"override {_key_shown(key)}: {_TOO_DEEP}") from None
    if isinstance(value, str | list | dict):
        return key, value
    literal = _SetText(raw)
    literal.parsed = value
    return key, literal


def _set_dotted(data: dict[str, Any], dotted: str, value: object) -> None:
    parts = dotted.split(".")
    over: dict[str, Any] = {}
    node = over
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    _merge(data, over)


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, object] | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Return the validated configuration.

    ``path`` wins over ``$EVOXTRAL_CONFIG`` (read from ``env``, default
    ``os.environ``); ``overrides`` maps dotted keys to values and wins over both.
    """
    data = _defaults()
    environ = os.environ if env is None else env
    chosen = path if path is not None else environ.get(CONFIG_ENV) or None
    if chosen is not None:
        _merge(data, _read_toml(Path(chosen)))
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    return _build(Config, data, "")


# --- [mqtt] -------------------------------------------------------------------
# Defined after Config: its annotations are strings, resolved only when built.


# What brokers reject in any MQTT string (a topic, the client id, the user
# name) as malformed UTF-8: control characters, surrogates and Unicode
# noncharacters; mosquitto drops the connection, here at the CONNECT already
# (the prefix is in the will's topic). Stream ids have them replaced
# (server/mqtt.py's topic_level); configured text must not hold them.
MQTT_UNSAFE_TEXT = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
    + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
    + "]")


@dataclass(frozen=True)
class MqttConfig:
    """The MQTT publisher (``server/mqtt.py``); see ``[mqtt]`` in config.toml."""

    enabled: bool
    host: str
    port: int = field(metadata=_range(1, 65535))
    prefix: str
    client_id: str
    username: str
    password: str
    tls: bool
    ca_file: str
    cert_file: str
    key_file: str
    protocol: str = field(metadata=_choices("auto", "5", "3.1.1"))
    keepalive_s: int = field(metadata=_range(5, 65535))
    timeout_s: float = field(metadata=_range(0.1, 300.0))
    queue_size: int = field(metadata=_range(1, 1_000_000))
    reconnect_min_s: float = field(metadata=_range(0.01, 3600.0))
    reconnect_max_s: float = field(metadata=_range(0.01, 3600.0))
    retain_final: bool
    forget_ended_s: float = field(metadata=_range(0.0, 31_536_000.0))
    drain_s: float = field(metadata=_range(0.0, 300.0))

    def __post_init__(self) -> None:
        p = self.prefix
        if (not p or p.startswith(("/", "$")) or p.endswith("/") or "//" in p
                or any(c in p for c in "+#\0")):
            raise ConfigError(
                "mqtt.prefix must be a non-empty topic without wildcards (+, #), NUL, "
                f"empty levels or a leading $ or /, got {p!r}"
            )
        for key in ("prefix", "client_id", "username"):
            bad = MQTT_UNSAFE_TEXT.search(getattr(self, key))
            if bad:
                raise ConfigError(
                    f"mqtt.{key} must not hold control characters, surrogates or Unicode "
                    f"noncharacters (brokers refuse them), got U+{ord(bad.group()):04X} "
                    f"in {getattr(self, key)!r}")
        h = self.host
        # A URL, a host:port or user@host is taken by nobody as a host name:
        # the engine would only log the broker as unreachable, for ever. (Two
        # colons or more are an IPv6 address.)
        if not h or any(c.isspace() for c in h) or "/" in h or "@" in h or h.count(":") == 1:
            raise ConfigError(f"mqtt.host must be a host name or address (the port goes in "
                              f"mqtt.port, credentials in mqtt.username), got "
                              f"{redact_host(h)!r}")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ConfigError(
                f"mqtt.reconnect_min_s must be at most mqtt.reconnect_max_s "
                f"({self.reconnect_max_s}), got {self.reconnect_min_s}"
            )
        if self.password and not self.username:
            raise ConfigError("mqtt.password needs mqtt.username, got an empty username")
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("mqtt.cert_file and mqtt.key_file must be set together, "
                              f"got cert_file={self.cert_file!r}, key_file={self.key_file!r}")
        if not self.tls and (self.ca_file or self.cert_file):
            # Without this the files would be ignored and the connection,
            # credentials included, would silently stay in clear text.
            raise ConfigError("mqtt.ca_file, mqtt.cert_file and mqtt.key_file need "
                              "mqtt.tls = true")
        if self.enabled and self.tls:
            # Read the files now, so a bad one stops the engine with one line
            # before anything serves. Imported here: the builder belongs with
            # the MQTT connection code, which imports this module.
            from .server.mqtt_connect import tls_context

            tls_context(self)


# --- [journal] ----------------------------------------------------------------


@dataclass(frozen=True)
class JournalConfig:
    """The durable log of finals (``engine/journal/``); see ``[journal]`` in config.toml."""

    enabled: bool
    dir: str
    fsync: str = field(metadata=_choices("always", "interval", "never"))
    fsync_interval_s: float = field(metadata=_range(0.01, 3600.0))
    max_bytes: int = field(metadata=_range(1024, 1 << 40))
    max_age_s: float = field(metadata=_range(0.0, 365 * 86400.0))
    keep: int = field(metadata=_range(0, 10_000))
    retention_s: float = field(metadata=_range(0.0, 100 * 365 * 86400.0))

    def __post_init__(self) -> None:
        if self.enabled and not self.dir:
            raise ConfigError("journal.dir must name a folder when journal.enabled = true")


# --- [logging] ----------------------------------------------------------------


@dataclass(frozen=True)
class LoggingConfig:
    """Log records on stderr (``logs.py``); see ``[logging]`` in config.toml.

    The command line's ``--log-format`` wins over ``format``, and ``--debug``
    or ``-q`` over ``level``.
    """

    format: str = field(metadata=_choices("text", "json"))
    level: str = field(metadata=_choices("debug", "info", "warning", "error"))


# --- [auth] -------------------------------------------------------------------

_HASH_PREFIX = "sha256:"


@dataclass(frozen=True)
class AuthTokenConfig:
    """One ``[[auth.tokens]]`` entry: a hashed token, its roles and limits.

    Entries are an array of tables, so the keys a user leaves out take the
    defaults declared here (documented in config.toml and docs/config.md).
    """

    hash: str
    roles: tuple[str, ...]
    name: str = ""
    streams: tuple[str, ...] = ("*",)
    max_streams: int = field(default=0, metadata=_range(0, 1_000_000))
    max_subscribers: int = field(default=0, metadata=_range(0, 1_000_000))

    def __post_init__(self) -> None:
        # What is wrong, never the value: a bad hash is most often the token.
        digest = self.hash.removeprefix(_HASH_PREFIX)
        wrong = ("it does not start with sha256:" if not self.hash.startswith(_HASH_PREFIX)
                 else "its digest is not 64 characters long" if len(digest) != 64
                 else "its digest holds characters other than 0-9 and a-f"
                 if any(c not in "0123456789abcdef" for c in digest) else None)
        if wrong is not None:
            raise ConfigError(
                f"auth.tokens hash must be sha256:<64 lowercase hex digits>, the hash of the "
                f"token (print it with `evoxtral-stream hash-token`), got {REDACTED}: {wrong}")
        bad = [r for r in self.roles if r not in ("ingest", "subscribe", "admin")]
        if bad or not self.roles:
            raise ConfigError(f"auth.tokens roles must be some of 'ingest', 'subscribe', "
                              f"'admin', got {list(self.roles)!r}")
        if not self.streams or not all(self.streams):
            raise ConfigError(f"auth.tokens streams must be non-empty glob patterns, "
                              f"got {list(self.streams)!r}")


@dataclass(frozen=True)
class AuthConfig:
    """Access tokens (``server/auth.py``); none configured means open access."""

    tokens: tuple[AuthTokenConfig, ...]

    def __post_init__(self) -> None:
        first: dict[str, int] = {}
        for n, t in enumerate(self.tokens):
            if (m := first.setdefault(t.hash, n)) != n:
                def entry(i: int) -> str:
                    return f"entry {i + 1} ({self.tokens[i].name or 'unnamed'})"
                raise ConfigError(f"auth.tokens lists the same token hash twice: {entry(m)} "
                                  f"and {entry(n)}; each entry needs a token of its own")
