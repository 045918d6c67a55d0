"""Configuration: layering, validation messages, open tables."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from evoxtral_stream import config as config_module
from evoxtral_stream.config import (
    CONFIG_ENV,
    Config,
    ConfigError,
    LoggingConfig,
    load_config,
    parse_override,
    to_toml,
)


def test_defaults_load_and_a_user_file_overrides_only_its_keys(tmp_path: Path) -> None:
    base = load_config(env={})
    mine = tmp_path / "mine.toml"
    mine.write_text("[vad]\naggressiveness = 3\n[server]\nport = 9000\n")
    cfg = load_config(mine, env={})
    assert (cfg.vad.aggressiveness, cfg.server.port) == (3, 9000)
    assert cfg.vad.frame_ms == base.vad.frame_ms
    assert load_config(env={CONFIG_ENV: str(mine)}).server.port == 9000
    # An explicit path wins over the environment; overrides win over both.
    other = tmp_path / "other.toml"
    other.write_text("[server]\nport = 9001\n")
    assert load_config(other, env={CONFIG_ENV: str(mine)}).server.port == 9001
    assert load_config(mine, {"server.port": 9002}, env={}).server.port == 9002


@pytest.mark.parametrize(("overrides", "message"), [
    ({"vad.aggressiveness": 7}, "vad.aggressiveness must be 0..3, got 7"),
    ({"vad.frame_ms": 25}, "vad.frame_ms must be one of 10, 20, 30, got 25"),
    ({"vad.start_ratio": "high"}, "vad.start_ratio must be float, got 'high'"),
    ({"worker.max_batch": True}, "worker.max_batch must be int, got True"),
    ({"model.backend": "gpt"}, "model.backend must be one of 'auto', 'voxtral', 'whisper'"),
    ({"vad.split_search_s": 30.0}, "vad.split_search_s must be"),
    # At 0 every ingest message was too fast, even at real time.
    ({"server.ingest_burst_s": 0}, "server.ingest_burst_s must be 0.5..86400.0, got 0"),
    ({"server.shutdown_flush_s": -1}, "server.shutdown_flush_s must be 0.0..300.0, got -1"),
    ({"model.voxtral.device": "tpu"}, "model.voxtral.device must be auto, cpu, cuda or cuda:N"),
    ({"vad.nope": 1}, "unknown config key 'vad.nope'"),
    ({"model.voxtral.adapters": {"rl": "x"}}, "needs model.voxtral.merge_lora = false"),
    ({"model.voxtral.encoder_graphs": True, "model.voxtral.merge_lora": False},
     "model.voxtral.encoder_graphs needs model.voxtral.merge_lora = true"),
    ({"model.voxtral.encoder_compile": True, "model.voxtral.merge_lora": False},
     "model.voxtral.encoder_compile needs model.voxtral.merge_lora = true"),
    ({"model.voxtral.prefill_graphs": True},
     "model.voxtral.prefill_graphs needs model.voxtral.encoder_graphs = true"),
    ({"model.voxtral.adapters": {"rl": 3}, "model.voxtral.merge_lora": False},
     "model.voxtral.adapters must be a table of name"),
    ({"logging.format": "xml"}, "logging.format must be one of 'text', 'json', got 'xml'"),
    ({"logging.format": "JSON"}, "logging.format must be one of 'text', 'json', got 'JSON'"),
    ({"logging.level": "trace"},
     "logging.level must be one of 'debug', 'info', 'warning', 'error', got 'trace'"),
    ({"logging.level": 10}, "logging.level must be one of 'debug', 'info', 'warning', 'error', "
                            "got '10'"),
    ({"logging.level": 1.5}, "logging.level must be str, got 1.5"),
    ({"vad.start_ratio": float("nan")}, "vad.start_ratio must be a finite number, got nan"),
    ({"worker.stall_timeout_s": float("nan")}, "worker.stall_timeout_s must be a finite number"),
    ({"vad.max_segment_s": float("-inf")}, "vad.max_segment_s must be a finite number"),
    ({"logging.colour": True}, "unknown config key 'logging.colour'"),
    ({"mqtt.host": "mqtt://broker"}, "mqtt.host must be a host name or address (the port goes "
                                     "in mqtt.port, credentials in mqtt.username), got "
                                     "'mqtt://broker'"),
    ({"mqtt.host": "broker:1883"}, "mqtt.host must be a host name or address"),
    ({"mqtt.host": "me@broker"}, "mqtt.host must be a host name or address"),
    ({"mqtt.host": "broker "}, "mqtt.host must be a host name or address"),
    ({"mqtt.host": ""}, "mqtt.host must be a host name or address"),
    # Cues at least 10 s and at most 1 s: every cue used to be stretched past
    # max_cue_s without a word.
    ({"captions.min_cue_s": 10.0, "captions.max_cue_s": 1.0},
     "captions.min_cue_s must be at most captions.max_cue_s (1.0), got 10.0"),
])
def test_bad_values_name_key_value_and_what_is_allowed(overrides: dict[str, object],
                                                       message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides, env={})
    assert message in str(err.value)


# Timeouts the engine cannot measure: 0 turns each off, and a positive value
# below a tenth of a second misfired. worker.stall_timeout_s = 0.01 gave
# every stream model_stalled error events (and /healthz 503) on each
# ordinary decode of a few milliseconds (found by tests/test_config_fuzz.py).
@pytest.mark.parametrize("key", ["audio.stall_timeout_s", "worker.stall_timeout_s"])
def test_timeouts_are_off_or_at_least_a_tenth_of_a_second(key: str) -> None:
    for fine in (0, 0.1, 1):
        section, name = key.split(".")
        assert getattr(getattr(load_config(overrides={key: fine}, env={}), section),
                       name) == fine
    for tiny in (0.001, 0.05, 0.0999):
        with pytest.raises(ConfigError) as err:
            load_config(overrides={key: tiny}, env={})
        assert str(err.value) == f"{key} must be 0 (off) or at least 0.1, got {tiny}"


# A working microphone calls back once a block: audio.stall_timeout_s = 0.1
# with audio.block_ms = 200 (each in its range) took the device for lost
# between any two blocks, so serve cut the open segment, sent
# audio_input_lost and reopened the device several times a second. The
# floor is five blocks (0.1 s at the default 20 ms, the key's own floor).
def test_the_microphone_stall_timeout_spans_five_blocks() -> None:
    for block_ms, fine in ((20, 0.1), (200, 1.0), (200, 0), (43, 0.215)):
        audio = load_config(overrides={"audio.block_ms": block_ms,
                                       "audio.stall_timeout_s": fine}, env={}).audio
        assert (audio.block_ms, audio.stall_timeout_s) == (block_ms, fine)
    for block_ms, short in ((200, 0.1), (200, 0.999), (43, 0.2)):
        with pytest.raises(ConfigError) as err:
            load_config(overrides={"audio.block_ms": block_ms,
                                   "audio.stall_timeout_s": short}, env={})
        assert str(err.value) == (
            f"audio.stall_timeout_s must be 0 (off) or at least 5 blocks of "
            f"audio.block_ms ({5 * block_ms / 1000:g} s), got {short}")


# The network's: a lost packet is sent again after 200 ms at the earliest,
# and a busy server reads it a moment later still. server.idle_timeout_s =
# 0.005 closed an ingest client sending audio back to back as idle, and
# 0.1 did so whenever the server was busy for a moment; server.ping_timeout_s
# = 0.001 dropped live clients with 1011 keepalive ping timeout (found by
# tests/test_config_fuzz.py).
@pytest.mark.parametrize("key", ["server.idle_timeout_s", "server.ping_timeout_s"])
def test_network_timeouts_are_off_or_at_least_a_second(key: str) -> None:
    for fine in (0, 1, 2.5):
        assert getattr(load_config(overrides={key: fine}, env={}).server,
                       key.split(".")[1]) == fine
    for short in (0.001, 0.1, 0.999):
        with pytest.raises(ConfigError) as err:
            load_config(overrides={key: short}, env={})
        assert str(err.value) == f"{key} must be 0 (off) or at least 1.0, got {short}"


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[vad\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, env={})
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"[vad]\naggressiveness = 3  # caf\xe9\n")
    with pytest.raises(ConfigError, match=f"config file {latin1} is not UTF-8 text"):
        load_config(latin1, env={})
    nan = tmp_path / "nan.toml"
    nan.write_text("[vad]\nstart_ratio = nan\n")
    with pytest.raises(ConfigError, match=r"vad\.start_ratio must be a finite number"):
        load_config(nan, env={})
    table = tmp_path / "table.toml"
    table.write_text("vad = 3\n")
    with pytest.raises(ConfigError, match="vad must be a table"):
        load_config(table, env={})


def test_a_bad_token_entry_names_which_one() -> None:
    """With several [[auth.tokens]], 'auth.tokens hash must be ...' left the
    user to guess which entry was wrong. The entry is named as an unknown
    key in it is: auth.tokens[1].hash."""
    good: dict[str, object] = {"name": "ok", "hash": "sha256:" + "a" * 64,
                               "roles": ["subscribe"]}
    cases: list[tuple[dict[str, object], str]] = [
        ({"hash": "sha256:..."},
         r"^auth\.tokens\[1\]\.hash must be .*, got <redacted>: its digest is not 64 "),
        ({"hash": "sha256:" + "0" * 63 + "x"},
         r"^auth\.tokens\[1\]\.hash must be .*, got <redacted>: its digest holds "),
        ({"roles": ["sub"]}, r"^auth\.tokens\[1\]\.roles must be "),
        ({"streams": [""]}, r"^auth\.tokens\[1\]\.streams must be "),
    ]
    for change, message in cases:
        tokens = [good, {**good, "name": "studio", "hash": "sha256:" + "b" * 64, **change}]
        with pytest.raises(ConfigError, match=message):
            load_config(env={}, overrides={"auth.tokens": tokens})


def test_overrides_parse_toml_literals_or_bare_strings() -> None:
    assert parse_override("server.host = 0.0.0.0") == ("server.host", "0.0.0.0")
    assert parse_override('model.language="fr"') == ("model.language", "fr")
    assert parse_override("server.allowed_origins=['a', 'b']") == \
        ("server.allowed_origins", ["a", "b"])
    cfg = load_config(overrides=dict(parse_override(t) for t in (
        "vad.aggressiveness=3", "model.voxtral.merge_lora=false")), env={})
    assert (cfg.vad.aggressiveness, cfg.model.voxtral.merge_lora) == (3, False)
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("no-equals-sign")


def test_a_string_key_set_to_something_toml_reads_otherwise_keeps_the_text(
        tmp_path: Path) -> None:
    def set_(*texts: str) -> Config:
        return load_config(overrides=dict(parse_override(t) for t in texts), env={})

    # The microphone by index, as config.toml says it may be chosen.
    assert set_("audio.device=2").audio.device == "2"
    assert set_("mqtt.password=0123", "mqtt.client_id=2024-01-01",
                "mqtt.username=1.50").mqtt == dataclasses.replace(
        load_config(env={}).mqtt, password="0123", client_id="2024-01-01", username="1.50")
    # Other keys still get the TOML value.
    cfg = set_("vad.start_ratio=0.5", "vad.aggressiveness=2", "server.allow_anonymous=true")
    assert (cfg.vad.start_ratio, cfg.vad.aggressiveness, cfg.server.allow_anonymous) == \
        (0.5, 2, True)
    with pytest.raises(ConfigError, match=r"vad\.aggressiveness must be int, got 1\.5"):
        set_("vad.aggressiveness=1.5")
    with pytest.raises(ConfigError, match=r"vad\.start_ratio must be a finite number, got nan"):
        set_("vad.start_ratio=nan")
    mine = tmp_path / "mine.toml"
    mine.write_text("[audio]\ndevice = 2\n")
    assert load_config(mine, env={}).audio.device == "2"


@pytest.mark.parametrize("literal", ["0x1F", "1_000", "+7", "123456", "1.5"])
def test_a_bare_number_for_a_text_key_in_a_file_is_refused_not_rewritten(
        tmp_path: Path, literal: str) -> None:
    # TOML keeps no literal's text: password = 0x1F would silently become "31".
    mine = tmp_path / "mine.toml"
    mine.write_text(f'[mqtt]\nusername = "u"\npassword = {literal}\n')
    with pytest.raises(ConfigError) as e:
        load_config(mine, env={})
    message = str(e.value)
    assert message.startswith("mqtt.password must be text")
    assert 'quote it: password = "..."' in message
    assert literal not in message and str(tomllib.loads(f"x = {literal}")["x"]) not in message
    mine.write_text('[mqtt]\nusername = "u"\npassword = "0x1F"\nclient_id = "7"\n')
    cfg = load_config(mine, env={})
    assert (cfg.mqtt.password, cfg.mqtt.client_id) == ("0x1F", "7")
    mine.write_text("[mqtt]\nclient_id = 2024\n")
    with pytest.raises(ConfigError, match=r"^mqtt\.client_id must be text, got the number "
                                          r"2024: quote it: client_id = \"\.\.\.\"$"):
        load_config(mine, env={})


def test_number_for_a_string_choice_is_accepted() -> None:
    # `--set mqtt.protocol=5` reads 5 as an integer; "5" is the choice.
    assert load_config(overrides={"mqtt.protocol": 5}, env={}).mqtt.protocol == "5"


def test_named_adapters_are_an_open_table(tmp_path: Path) -> None:
    mine = tmp_path / "mine.toml"
    mine.write_text('[model.voxtral]\nmerge_lora = false\n'
                    '[model.voxtral.adapters]\nrl = "YongkangZOU/evoxtral-rl"\n')
    cfg = load_config(mine, env={})
    assert cfg.model.voxtral.adapters == {"rl": "YongkangZOU/evoxtral-rl"}


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_voxtral_base_is_refused(blank: str) -> None:
    """To pathlib "" is the working folder: a blank base loaded whatever
    checkpoint lay there, or failed naming folder '.'. (A blank
    ``model.voxtral.adapter`` stays: it means plain Voxtral; a blank extra
    adapter was already refused as not a table of name = "text".)"""
    with pytest.raises(ConfigError) as e:
        load_config(overrides={"model.voxtral.base": blank}, env={})
    assert str(e.value) == "model.voxtral.base is empty; set it to a hub id or a local folder"
    assert load_config(overrides={"model.voxtral.adapter": ""}, env={}).model.voxtral.adapter == ""


def test_logging_defaults_to_todays_text_at_info_and_a_file_may_choose_json(
        tmp_path: Path) -> None:
    assert load_config(env={}).logging == LoggingConfig(format="text", level="info")
    mine = tmp_path / "mine.toml"
    mine.write_text('[logging]\nformat = "json"\n')
    cfg = load_config(mine, env={})
    assert (cfg.logging.format, cfg.logging.level) == ("json", "info")
    assert load_config(mine, {"logging.level": "debug"}, env={}).logging.level == "debug"


# --- writing the effective config back out ---------------------------------------------


@pytest.mark.parametrize("overrides", [
    {},
    {"vad.aggressiveness": 3, "server.allowed_origins": ["https://a.example", "http://b:8"],
     "model.voxtral.merge_lora": False,
     "model.voxtral.adapters": {"studio voice": "/w/a", "plain": "org/x"},
     "audio.device": 'USB "Pro" \\ Mic\tß 🎙\n', "journal.enabled": True,
     "journal.dir": "/var/lib/évox", "stream.partial_interval_ms": 0,
     "worker.stall_timeout_s": 1e-1, "mqtt.username": "u",
     "auth.tokens": [{"name": "a", "hash": "sha256:" + "a" * 64, "roles": ["ingest"]},
                     {"hash": "sha256:" + "b" * 64, "roles": ["subscribe", "admin"],
                      "streams": ["studio-*"], "max_subscribers": 3}]},
    # DEL is a control character TOML refuses raw, which JSON leaves raw: it
    # used to be printed as is, a file `config --config` could not read back.
    {"audio.device": "cam\x7f1", "model.voxtral.merge_lora": False,
     "model.voxtral.adapters": {"del\x7fkey": "x\x7fy"}},
])
def test_to_toml_reads_back_to_the_same_config(tmp_path: Path,
                                               overrides: dict[str, object]) -> None:
    cfg = load_config(env={}, overrides=overrides)
    path = tmp_path / "effective.toml"
    path.write_text(to_toml(cfg), "utf-8")
    assert load_config(path, env={}) == cfg
    assert to_toml(load_config(path, env={})) == to_toml(cfg)


def _layout(text: str) -> list[str]:
    """The tables and keys of a TOML file, in order: ``[mqtt]``, ``mqtt.host``..."""
    table, layout = "", []
    for line in text.splitlines():
        if header := re.match(r"\[+([^\]]+)\]+", line):
            table = header[1]
            layout.append(f"[{table}]")
        elif key := re.match(r"([A-Za-z0-9_-]+)\s*=", line):
            layout.append(f"{table}.{key[1]}")
    return layout


def test_to_toml_keeps_the_bundled_files_order_of_sections_and_keys() -> None:
    """``evoxtral-stream config`` printed [auth] after [mqtt], the order of
    the Config fields, where the bundled config.toml (which the docs follow)
    has it before."""
    bundled = (Path(config_module.__file__).parent / "config.toml").read_text("utf-8")
    assert _layout(to_toml(load_config(env={}))) == _layout(bundled)


def test_to_toml_redacts_the_mqtt_password(tmp_path: Path) -> None:
    cfg = load_config(env={}, overrides={"mqtt.username": "u", "mqtt.password": "hunter2"})
    text = to_toml(cfg)
    assert "hunter2" not in text
    assert 'password = "<redacted>"' in text
    assert 'password = ""' in to_toml(load_config(env={}))  # nothing to hide


def test_a_file_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Windows editors (Notepad) start UTF-8 files with a BOM, as the eval
    manifest reader allows: tomllib took it for a statement, refusing the
    file with 'Invalid statement (at line 1, column 1)', nothing to see
    there."""
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf[vad]\r\naggressiveness = 3\r\n")
    assert load_config(bom, env={}).vad.aggressiveness == 3


def test_values_nested_too_deeply_for_the_toml_reader_are_a_config_error(
        tmp_path: Path) -> None:
    """tomllib parses nested arrays and inline tables by recursion: a file
    (or --set) nesting them thousands deep raised RecursionError, a
    traceback instead of one line (and at a SIGHUP, a reload that died)."""
    deep = tmp_path / "deep.toml"
    deep.write_text("[vad]\naggressiveness = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"config file {deep} is not valid TOML: "
                                                    "values nested too deeply")):
        load_config(deep, env={})
    tables = tmp_path / "tables.toml"
    tables.write_text("a = " + "{x = " * 3000 + "1" + "}" * 3000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(tables, env={})
    with pytest.raises(ConfigError, match=r"override vad\.aggressiveness: values nested "
                                          "too deeply"):
        parse_override("vad.aggressiveness=" + "[" * 5000 + "]" * 5000)


@pytest.mark.parametrize("host", ["broker.local", "10.0.0.7", "::1", "fe80::1%eth0", "mqtt"])
def test_mqtt_hosts_that_name_a_host(host: str) -> None:
    assert load_config(overrides={"mqtt.host": host}, env={}).mqtt.host == host
