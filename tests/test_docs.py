"""The docs stay true: config keys, CLI options, error codes and metrics documented,
protocol examples valid, README commands present."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import cast

import pytest

from tests.docs_schema import ROOT, protocol_schema, validate_message


def _flat(table: dict[str, object], prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for k, v in table.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _keys(table: dict[str, object]) -> list[str]:
    return [k for k, _ in _flat(table)]


def test_every_config_key_is_documented() -> None:
    config = tomllib.loads((ROOT / "config.toml").read_text())
    doc = (ROOT / "docs" / "config.md").read_text()
    missing = [k for k in _keys(config) if f"`{k.rsplit('.', 1)[-1]}`" not in doc]
    assert not missing, f"docs/config.md does not mention: {missing}"


# Dotted names in the docs that start like a config section but are no key:
# message types, the realtime API's session fields, a file name.
_NOT_KEYS = ("stream.started", "stream.ended", "model.bin", "audio.input.")


def test_every_config_key_the_docs_name_exists() -> None:
    """`section.key` in README.md, clients/README.md and docs/*.md (in
    backticks, as `key = value`, or after --set) is a key of config.toml, so
    a renamed or removed key leaves no instruction a user cannot follow."""
    config = tomllib.loads((ROOT / "config.toml").read_text())
    keys = set(_keys(config))
    sections = {k.rsplit(".", 1)[0] for k in keys} | {k.split(".", 1)[0] for k in keys}
    keys |= sections
    text = _docs_text() + (ROOT / "clients" / "README.md").read_text()
    named = set(re.findall(r"`([a-z_]+(?:\.[a-z0-9_]+)+)(?: ?=[^`]*)?`", text))
    named |= set(re.findall(r"--set '?([a-z_]+(?:\.[a-z0-9_]+)+)=", text))
    assert "audio.split_channels" in named and "worker.drain_timeout_s" in named
    unknown = sorted(n for n in named if n.split(".", 1)[0] in sections and n not in keys
                     and not n.startswith(_NOT_KEYS))
    assert not unknown, f"the docs name config keys that config.toml lacks: {unknown}"


def test_the_defaults_the_docs_state_are_config_tomls() -> None:
    """A number the docs give in parentheses right after a key
    (`` `server.shutdown_flush_s` (2 s) ``, `` `forget_ended_s` (default
    86400 ``, `` `retention_s` seconds (default 7 days ``) is that key's
    default in config.toml, so a changed default leaves no page saying the
    old one; a key named by its last part alone counts where that part
    names one key."""
    flat = dict(_flat(tomllib.loads((ROOT / "config.toml").read_text())))
    text = (_docs_text() + (ROOT / "clients" / "README.md").read_text()).replace("\n", " ")
    stated = re.findall(r"`([a-z_]+(?:\.[a-z0-9_]+)*)`(?: seconds)?,? \((?:default )?"
                        r"(-?\d[\d,]*(?:\.\d+)?)( days?)?(?=[ ,;)])", text)
    checked, wrong = 0, []
    for name, number, days in stated:
        keys = [k for k in flat if k == name or k.endswith("." + name)]
        if len(keys) != 1 or isinstance(flat[keys[0]], bool) \
                or not isinstance(flat[keys[0]], (int, float)):
            continue
        checked += 1
        if float(number.replace(",", "")) * (86400 if days else 1) != flat[keys[0]]:
            wrong.append(f"`{name}` ({number}{days}): config.toml has {flat[keys[0]]}")
    assert checked >= 8, "the pattern no longer finds the defaults the docs state"
    assert not wrong, f"the docs state defaults config.toml does not have: {wrong}"


def test_readme_has_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    for marker in ("main-command", "test-command"):
        block = re.search(rf"<!-- {marker} -->\n```sh\n(.+?)\n```\n<!-- /{marker} -->",
                          readme, re.S)
        assert block is not None, f"README.md lacks the {marker} block"
    assert "pip install torch==2.13.0" in readme


def test_root_config_is_the_packaged_one() -> None:
    packaged = ROOT / "src" / "evoxtral_stream" / "config.toml"
    assert (ROOT / "config.toml").read_bytes() == packaged.read_bytes()


def _docs_text() -> str:
    """What a user reads: the README and docs/*.md."""
    return "\n".join(p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])


def test_every_cli_command_and_option_is_documented() -> None:
    from evoxtral_stream.cli.parser import _parser

    docs = _docs_text()
    (sub,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [f"evoxtral-stream {name}" for name in sub.choices
               if f"evoxtral-stream {name}" not in docs]
    # The options before the command (`--version` has no command) too.
    for name, parser in [("evoxtral-stream", _parser()), *sub.choices.items()]:
        for action in parser._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help" \
                        and not re.search(rf"{re.escape(opt)}(?![\w-])", docs):
                    missing.append(f"{name} {opt}")
    assert not missing, f"README.md and docs/*.md do not mention: {missing}"


def test_eval_names_the_metrics_the_readme_does() -> None:
    """`eval --help` names the metrics the README's usage line says it
    reports (the list in parentheses, the line's comment), so a metric added
    to one is added to the other."""
    from evoxtral_stream.cli.parser import _parser

    readme = (ROOT / "README.md").read_text()
    line = re.search(r"^evoxtral-stream eval .*# (.+)$", readme, re.M)
    assert line is not None, "README.md's usage block has no eval line"
    (sub,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    (choice,) = [c for c in sub._choices_actions if c.dest == "eval"]
    listed = re.search(r"\((.+)\)$", choice.help or "")
    assert listed is not None, f"eval's help lists no metrics: {choice.help!r}"
    assert listed.group(1) == line.group(1).strip(), \
        f"eval --help lists ({listed.group(1)}), README.md ({line.group(1).strip()})"


# Where the server and engine name an error code: the first string literal
# of these calls (after one plain argument such as `ws` or a stream id).
_ERROR_CALL = re.compile(
    r"\b(?:report_error|StreamError|ProtocolError|RealtimeProtocolError|encode_error|_refuse|"
    r"refuse_realtime|error)\(\s*(?:[\w.]+,\s*)?\"([a-z][a-z0-9_]*)\"")


def _documented_codes(doc: str) -> set[str]:
    """The codes in the first column of protocol.md's `| code |` tables."""
    codes: set[str] = set()
    for rows in re.findall(r"^\| code \|.*\n\|[- |]+\n((?:\|.*\n)+)", doc, re.M):
        for row in rows.splitlines():
            # "`decode_failed` (`type` `server_error`)": the codes come first.
            codes |= set(re.findall(r"`([a-z][a-z0-9_]*)`", row.split("|")[1].split("(")[0]))
    return codes


def test_every_error_code_is_in_a_protocol_table() -> None:
    emitted: set[str] = set()
    for path in (ROOT / "src" / "evoxtral_stream").rglob("*.py"):
        emitted |= set(_ERROR_CALL.findall(path.read_text()))
    # The pattern still sees the call sites (a rename would empty it).
    assert {"decode_failed", "bad_json", "too_large", "audio_input_lost",
            "invalid_value", "unsupported_intent"} <= emitted
    documented = _documented_codes((ROOT / "docs" / "protocol.md").read_text())
    assert not emitted - documented, \
        f"docs/protocol.md has no table row for: {sorted(emitted - documented)}"
    assert not documented - emitted, \
        f"docs/protocol.md lists codes nothing emits: {sorted(documented - emitted)}"


# evoxtral_* names in the docs that are not metrics.
_NOT_METRICS = {"evoxtral_stream", "evoxtral_merge", "evoxtral_grouped_sdpa"}


def test_metrics_named_in_the_docs_exist() -> None:
    source = (ROOT / "src" / "evoxtral_stream" / "server" / "metrics.py").read_text()
    text = _docs_text() + (ROOT / "config.toml").read_text()
    named = set(re.findall(r"\bevoxtral_[a-z_]+", text)) - _NOT_METRICS
    assert "evoxtral_worker_stalls" in named
    # Counters are exported with a _total suffix; the source names the family.
    missing = sorted(n for n in named if f'"{n.removesuffix("_total")}"' not in source)
    assert not missing, f"docs name metrics that server/metrics.py does not export: {missing}"


def test_protocol_examples_match_the_schema() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text()
    examples = doc.split("## JSON Schema", 1)[0]  # the v1 part; realtime has its own shapes
    messages: list[dict[str, object]] = []
    for block in re.findall(r"^( *)```json\n(.*?)\n\1```", examples, re.S | re.M):
        text = textwrap.dedent(block[1])
        try:
            messages.append(json.loads(text))
        except json.JSONDecodeError:  # one message per line
            messages += [json.loads(line) for line in text.splitlines() if line.strip()]
    messages += [json.loads(m) for m in re.findall(r"`(\{\"type\".*?\})`", examples)]
    server_types = set(protocol_schema()["$defs"])
    sent = [m for m in messages if m["type"] in server_types]
    assert {m["type"] for m in sent} >= {"hello", "caption", "gap", "error", "ingest.ready",
                                        "ingest.progress", "ingest.summary", "stream.started",
                                        "stream.ended"}
    for message in sent:
        validate_message(message)


# Exported only where torch is imported and CUDA is available: no CPU run has it.
_GPU_METRIC = "evoxtral_gpu_memory_allocated_bytes"


def _documented_metrics(doc: str) -> set[str]:
    """The names in the first column of protocol.md's `| metric |` table,
    without their labels (`evoxtral_captions_total{kind}`)."""
    tables = re.findall(r"^\| metric \|.*\n\|[- |]+\n((?:\|.*\n)+)", doc, re.M)
    assert tables, "docs/protocol.md has no `| metric |` table"
    return {name for rows in tables for row in rows.splitlines()
            for name in re.findall(r"`(evoxtral_[a-z_]+)", row.split("|")[1])}


async def test_every_metric_the_server_exposes_is_documented() -> None:
    """Every family /metrics exposes, read from a real engine's registry with
    a broadcaster and an MQTT publisher's counters (a counter as scraped, with
    `_total`), is a row of docs/protocol.md's metrics table, and every row is
    one of them."""
    from evoxtral_stream.config import load_config
    from evoxtral_stream.engine.engine import Engine
    from evoxtral_stream.server.broadcast import Broadcaster
    from evoxtral_stream.server.metrics import Metrics
    from evoxtral_stream.server.mqtt import MqttStats
    from evoxtral_stream.server.protocol import encode_event
    from tests.fakes import ScriptedBackend

    engine = Engine(load_config(env={}), ScriptedBackend())
    metrics = Metrics(engine, Broadcaster(8, encode_event))
    metrics.watch_mqtt(lambda: MqttStats(
        connected=True, protocol="5", queued=0, published=0, superseded=0,
        dropped_partials=0, dropped_finals=0, failed=0, connects=1, connect_failures=0,
        last_error=None))
    async with engine:
        families = list(metrics.registry.collect())
    exposed = {f.name + "_total" if f.type == "counter" else f.name for f in families}
    source = (ROOT / "src" / "evoxtral_stream" / "server" / "metrics.py").read_text()
    # What this run cannot show: only the GPU gauge, which the source names.
    assert set(re.findall(r'"(evoxtral_[a-z_]+)"', source)) - {f.name for f in families} \
        == {_GPU_METRIC}
    exposed.add(_GPU_METRIC)
    documented = _documented_metrics((ROOT / "docs" / "protocol.md").read_text())
    assert not exposed - documented, \
        f"docs/protocol.md's metrics table lacks: {sorted(exposed - documented)}"
    assert not documented - exposed, \
        f"docs/protocol.md's metrics table names what /metrics lacks: " \
        f"{sorted(documented - exposed)}"


def test_every_client_option_is_documented() -> None:
    """Each option of viewer.py, mic_client.py and tts_bridge.py is named in
    clients/README.md."""
    clients = ROOT / "clients"
    if str(clients) not in sys.path:
        sys.path.insert(0, str(clients))
    doc = (clients / "README.md").read_text()
    missing = []
    for name in ("viewer", "mic_client", "tts_bridge"):
        parser: argparse.ArgumentParser = importlib.import_module(name).build_parser()
        for action in parser._actions:
            missing += [f"{name}.py {opt}" for opt in action.option_strings
                        if opt.startswith("--") and opt != "--help"
                        and not re.search(rf"{re.escape(opt)}(?![\w-])", doc)]
    assert not missing, f"clients/README.md does not mention: {missing}"


def test_every_module_is_in_the_readme_layout() -> None:
    """Each module and package of src/evoxtral_stream is named (by its name,
    as a word) in the README's Layout block, so a new one is explained."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Layout\n\n```\n(.*?)\n```", readme, re.S)
    assert block is not None, "README.md has no Layout block"
    src = ROOT / "src" / "evoxtral_stream"
    names = {p.stem for p in src.rglob("*.py") if p.stem not in ("__init__", "__main__")}
    names |= {p.name for p in src.rglob("*") if (p / "__init__.py").is_file()}
    missing = sorted(n for n in names if not re.search(rf"(?<![\w/.]){n}\b", block.group(1)))
    assert not missing, f"README.md's Layout does not name: {missing}"


def test_every_client_file_is_in_the_clients_readme() -> None:
    """Each clients/*.py, a client or a module of theirs, is named in
    clients/README.md (as `name.py`), so a new one is explained."""
    clients = ROOT / "clients"
    doc = (clients / "README.md").read_text()
    missing = sorted(p.name for p in clients.glob("*.py") if f"`{p.name}`" not in doc)
    assert not missing, f"clients/README.md does not name: {missing}"


def test_voxtral_md_names_the_pins_of_the_voxtral_extra() -> None:
    """The versions docs/voxtral.md says the `voxtral` extra pins are those
    pyproject.toml pins (each `name==version` of the extra)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {r.split(";")[0].strip() for r in project["optional-dependencies"]["voxtral"]
            if "==" in r}
    assert any(p.startswith("transformers==") for p in pins)
    doc = (ROOT / "docs" / "voxtral.md").read_text()
    line = re.search(r"the `voxtral` extra, which pins[^|]*", doc)
    assert line is not None, "docs/voxtral.md no longer says what the voxtral extra pins"
    named = set(re.findall(r"`([\w.\[\]-]+==[\w.]+)`", line.group()))
    assert named == pins, \
        f"docs/voxtral.md names {sorted(named)}, pyproject.toml pins {sorted(pins)}"


def _heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case,
    punctuation but `-` and `_` dropped, spaces as `-`."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_every_link_between_the_docs_lands() -> None:
    """Each relative link of README.md, clients/README.md and docs/*.md
    names a file that exists, and its `#anchor` a heading of that file, so a
    renamed heading or file leaves no dead link."""
    docs = [ROOT / "README.md", ROOT / "clients" / "README.md",
            *sorted((ROOT / "docs").glob("*.md"))]
    dead = []
    anchored = 0
    for doc in docs:
        for target, anchor in re.findall(r"\]\(([^)#\s:]*)(?:#([^)\s]+))?\)",
                                         doc.read_text()):
            path = (doc.parent / target) if target else doc
            where = f"{doc.relative_to(ROOT)}: ({target}{'#' + anchor if anchor else ''})"
            if not path.exists():
                dead.append(where)
            elif anchor:
                anchored += 1
                if anchor not in _heading_anchors(path.read_text()):
                    dead.append(where)
    assert anchored > 20, "the pattern no longer finds the docs' anchored links"
    assert not dead, f"links to no file or heading: {dead}"


def test_voxtral_md_names_every_file_an_export_copies() -> None:
    """The files export-merged copies from the base (export.py's _COPIED)
    are named in docs/voxtral.md's export section."""
    source = (ROOT / "src" / "evoxtral_stream" / "engine" / "backends" / "voxtral"
              / "export.py").read_text()
    copied = re.search(r"^_COPIED = \((.*?)\)", source, re.S | re.M)
    assert copied is not None, "export.py no longer lists the files it copies as _COPIED"
    names = re.findall(r'"([\w.]+)"', copied.group(1))
    assert "tekken.json" in names
    section = (ROOT / "docs" / "voxtral.md").read_text().split("## Export a merged", 1)[1]
    section = section.split("\n## ", 1)[0]
    missing = [n for n in names if f"`{n}`" not in section]
    assert not missing, f"docs/voxtral.md's export section does not name: {missing}"


def test_voxtral_md_hf_download_of_the_base_fetches_what_the_engine_does(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """docs/voxtral.md's `hf download` of the base, read by the real `hf`
    CLI, asks the hub for the files the engine's own download takes
    (resolve._BASE_PATTERNS, less the note only an export holds): `hf`'s
    --include takes one pattern, and the words after it are file names that
    replace every --include, the weights among them. No network: the
    download itself is replaced."""
    pytest.importorskip("huggingface_hub.cli.hf")
    import huggingface_hub.cli.download as hf_download
    from huggingface_hub.cli.hf import app

    from evoxtral_stream.engine.backends.voxtral.resolve import _BASE_PATTERNS

    asked: list[dict[str, object]] = []

    def download(**kw: object) -> str:
        asked.append(kw)
        return str(tmp_path)

    monkeypatch.setattr(hf_download, "snapshot_download", download)
    monkeypatch.setattr(hf_download, "hf_hub_download", download)
    doc = (ROOT / "docs" / "voxtral.md").read_text()
    cmd = re.search(r"^hf download mistralai/\S+(?:.*\\\n)*.*$", doc, re.M)
    assert cmd is not None, "docs/voxtral.md no longer shows the base's hf download"
    app(shlex.split(cmd.group().replace("\\\n", " "))[1:], standalone_mode=False)
    assert len(asked) == 1
    wanted = set(_BASE_PATTERNS) - {"evoxtral_merge.json"}
    assert set(cast(list[str], asked[0]["allow_patterns"]) or ()) == wanted


def test_the_live_rows_bound_is_the_consoles() -> None:
    """README.md (transcribe's console) and clients/README.md (the viewer)
    say how many live partial rows a terminal shows: console.MAX_LIVE_ROWS."""
    from evoxtral_stream.console import MAX_LIVE_ROWS

    for doc in (ROOT / "README.md", ROOT / "clients" / "README.md"):
        text = doc.read_text().replace("\n", " ")
        said = re.findall(r"row of its own[^.]*?\(at most (\d+)", text)
        assert said, f"{doc.relative_to(ROOT)} no longer says how many live rows are shown"
        assert {int(n) for n in said} == {MAX_LIVE_ROWS}, \
            f"{doc.relative_to(ROOT)} says at most {said}, the console shows {MAX_LIVE_ROWS}"


# The config errors docs/config.md quotes, each with a command line's --set
# values that make it; " ..." in a quote stands for words left out.
_QUOTED_CONFIG_ERRORS = [
    (["vad.aggressiveness=7"], "vad.aggressiveness must be 0..3, got 7"),
    (['auth.tokens=[{hash="hunter2", roles=["admin"]}]'],
     "auth.tokens[0].hash must be sha256:<64 lowercase hex digits> ... got <redacted>: "
     "it does not start with sha256:"),
    (["server.host=cam:hunter2@0.0.0.0"],
     "server.host '<redacted>@0.0.0.0' is reachable from other machines ..."),
    (["=hunter2"], "override '=<redacted>' has no key"),
    (["mqtt.password hunter2"], "override 'mqtt.password<redacted>' has no '='"),
    (["mqtt.passwordhunter2"], "override 'mqtt.password<redacted>' has no '='"),
    (["mqtt.passwordhunter2=="], "unknown config key 'mqtt.password<redacted>' ..."),
    (["mqtt.password"], "override 'mqtt.password' has no '='"),
]
# Quoted errors of a file (a bare number for a text key) or of the address
# (a name lookup), which a --set does not make here.
_QUOTED_ELSEWHERE = ('mqtt.password must be text: quote it: password = "..."',
                     "cannot listen on <redacted>@localhost:8765")


def test_the_config_errors_the_docs_quote_are_the_ones_given() -> None:
    """Each error line docs/config.md quotes (`key must be ...`, `override
    ...`, `server.host ... is reachable`) is what the configuration says for
    such a value, so a reworded message leaves no page quoting the old one."""
    from evoxtral_stream.cli.serve import _check_serving
    from evoxtral_stream.config import ConfigError, load_config, parse_override

    doc = (ROOT / "docs" / "config.md").read_text().replace("\n", " ")
    quoted = set(re.findall(r"`((?:[\w.\[\] ]+ must be|override '|server\.host '|cannot listen"
                            r"|unknown config key)"
                            r"[^`]*)`", doc))
    assert quoted == {q for _, q in _QUOTED_CONFIG_ERRORS} | set(_QUOTED_ELSEWHERE), \
        "docs/config.md quotes other config errors than this test makes"
    for given, quote in _QUOTED_CONFIG_ERRORS:
        try:
            _check_serving(load_config(env={}, overrides=dict(map(parse_override, given))))
        except ConfigError as e:
            said = str(e)
        else:
            raise AssertionError(f"{given} is no config error")
        pattern = ".*".join(map(re.escape, re.split(r" \.\.\.(?: |$)", quote)))
        assert re.search(pattern, said), f"docs/config.md quotes {quote!r}, {given} says {said!r}"


def _flat_text(path: str) -> str:
    """A doc's text on one line, runs of white space as one space, so a
    phrase the doc wraps still matches."""
    return re.sub(r"\s+", " ", (ROOT / path).read_text())


def test_the_limits_the_docs_state_are_the_codes() -> None:
    """The fixed limits and waits docs/protocol.md and clients/README.md
    state in words (a sample rate range, how many stream ends are kept, a
    realtime buffer's cap, the clients' backoff...) are the constants the
    server and clients use, so a changed constant leaves no page saying the
    old number. Each phrase must still be found: a reworded one is updated here."""
    import inspect

    from evoxtral_stream.audio.vad import HELD_GAP_S
    from evoxtral_stream.engine.engine import SEQ_REMEMBERED
    from evoxtral_stream.engine.journal.store import PRUNED_REMEMBERED, SEQ_RESERVE_BLOCK
    from evoxtral_stream.events import MAX_STREAM_ID, MAX_STREAM_ID_ENCODED
    from evoxtral_stream.server import app, protocol
    from evoxtral_stream.server.broadcast import ENDS_REMEMBERED
    from evoxtral_stream.server.realtime import INPUT_RATE, MAX_BUFFER_S, MIN_COMMIT_MS

    clients = ROOT / "clients"
    if str(clients) not in sys.path:
        sys.path.insert(0, str(clients))
    mic_client, tts_bridge, viewer = (importlib.import_module(n)
                                      for n in ("mic_client", "tts_bridge", "viewer"))
    bridge = tts_bridge.BridgeConfig.__dataclass_fields__
    stated: list[tuple[str, str, tuple[float, ...]]] = [
        ("docs/protocol.md", r"the ([\d,]+) streams that ended last", (ENDS_REMEMBERED,)),
        ("docs/protocol.md", r"the ([\d,]+) that ended last", (SEQ_REMEMBERED,)),
        ("docs/protocol.md", r"the ([\d,]+) pruned most recently", (PRUNED_REMEMBERED,)),
        ("docs/protocol.md", r"remembers the ([\d,]+) streams", (SEQ_REMEMBERED,)),
        ("docs/protocol.md", r"in blocks of (\d+)", (SEQ_RESERVE_BLOCK,)),
        ("docs/protocol.md", r"`sample_rate` is an integer from (\d+) to (\d+)",
         (protocol.MIN_INGEST_RATE, protocol.MAX_INGEST_RATE)),
        ("docs/protocol.md", r"`channels` is (\d+) to (\d+)", (1, protocol._MAX_CHANNELS)),
        ("docs/protocol.md", r"from 0 to `sample_rate` × (\d+)", (protocol.MAX_LOST_S,)),
        ("docs/protocol.md", r"a bucket of its own that holds (\d+) s", (protocol.MAX_LOST_S,)),
        ("docs/protocol.md", r"once the first (\d+) s of it are used up", (protocol.MAX_LOST_S,)),
        ("docs/protocol.md", r"is (\d+) to (\d+) characters", (1, MAX_STREAM_ID)),
        ("docs/protocol.md", r"at most (\d+) bytes once percent-encoded", (MAX_STREAM_ID_ENCODED,)),
        ("docs/protocol.md", r"events (\d+) s after the flush", (app._FINALS_SENT_S,)),
        ("docs/protocol.md", r"does not read again within about (\d+) s", (app.CLOSE_TIMEOUT_S,)),
        ("docs/protocol.md", r"take the close either, (\d+) s later", (app.CLOSE_TIMEOUT_S + 1,)),
        ("docs/protocol.md", r"a piece more than (\d+) s before", (HELD_GAP_S,)),
        ("docs/protocol.md", r"pieces more than (\d+) s apart", (HELD_GAP_S,)),
        ("docs/protocol.md", r"A buffer under (\d+) ms", (MIN_COMMIT_MS,)),
        ("docs/protocol.md", r"At most (\d+) s may be held", (MAX_BUFFER_S,)),
        ("docs/protocol.md", r'"audio/pcm", "rate": (\d+)\}', (INPUT_RATE,)),
        ("docs/protocol.md", r"little-endian, mono, (\d+) kHz", (INPUT_RATE / 1000,)),
        ("docs/protocol.md", r"drop audio past (\d+) s of it", (mic_client.MAX_IN_FLIGHT_S,)),
        ("clients/README.md", r"`since=` holds at most (\d+) KB",
         (protocol.RESUME_QUERY_BYTES / 1024,)),
        ("clients/README.md", r"retries every ([\d.]+) s, backing off to ([\d.]+) s",
         (0.25, inspect.signature(viewer.watch).parameters["max_retry_s"].default)),
        ("clients/README.md", r"waiting ([\d.]+) s, then twice as long each time up to ([\d.]+) s",
         mic_client.BACKOFF_S),
        ("clients/README.md", r"after ([\d.]+) s, doubling up to ([\d.]+) s",
         (bridge["reconnect_min_s"].default, bridge["reconnect_max_s"].default)),
        ("clients/README.md", r"up to (\d+) s of audio waits", (mic_client.MAX_IN_FLIGHT_S,)),
        ("clients/README.md", r"past (\d+) s of audio sent", (mic_client.MAX_IN_FLIGHT_S,)),
    ]
    wrong = []
    for doc, phrase, values in stated:
        found = re.findall(phrase, _flat_text(doc))
        assert found, f"{doc} no longer says {phrase!r}: update this test"
        for match in found:
            numbers = tuple(float(n.replace(",", "")) for n in
                            (match if isinstance(match, tuple) else (match,)))
            if numbers != tuple(float(v) for v in values):
                wrong.append(f"{doc}: {phrase!r} says {numbers}, the code has {values}")
    assert not wrong, "the docs state limits the code does not have:\n" + "\n".join(wrong)


def test_the_realtime_events_are_the_docs() -> None:
    """Every client event type /v1/realtime takes and every server event type
    it sends is named in docs/protocol.md's realtime section, and each row of
    its client events table is one the server takes."""
    source = (ROOT / "src" / "evoxtral_stream" / "server" / "realtime" / "protocol.py").read_text()
    parse = source.split("def parse_client_event", 1)[1].split("\ndef ", 1)[0]
    send = source.split("def server_event_to_dict", 1)[1].split("\ndef ", 1)[0]
    taken = set(re.findall(r'kind == "([a-z_.]+)"', parse))
    sent = set(re.findall(r'"([a-z_]+(?:\.[a-z_]+)+)"', send))
    assert {"input_audio_buffer.append", "session.update"} <= taken
    assert {"session.created", "conversation.item.input_audio_transcription.completed",
            "transcription_session.updated"} <= sent
    section = (ROOT / "docs" / "protocol.md").read_text().split(
        "## OpenAI Realtime compatibility", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)+)`", section))
    missing = sorted((taken | sent) - named)
    assert not missing, f"docs/protocol.md's realtime section does not name: {missing}"
    table = re.search(r"^\| event \|.*\n\|[- |]+\n((?:\|.*\n)+)", section, re.M)
    assert table is not None, "the realtime section has no `| event |` table"
    rows = {re.sub(r"[`\s]", "", row.split("|")[1]) for row in table.group(1).splitlines()}
    assert not rows - taken, f"the client events table names what the server refuses: " \
        f"{sorted(rows - taken)}"


def _readme_number(pattern: str) -> float:
    """The number README.md states where ``pattern`` (its one group) finds
    it, line breaks read as spaces; words for the small ones."""
    found = re.findall(pattern, _flat_text("README.md"))
    assert len(found) == 1, f"README.md no longer says it once: {pattern!r} found {found}"
    words = {"half a": 0.5, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
    return float(words.get(found[0], found[0]))


def test_the_numbers_the_readme_states_are_the_codes() -> None:
    """Numbers README.md gives that the code holds as constants (the rates
    a file may have, how far ahead a pipe may run before it is said, how
    often the TLS files are checked, the silence that breaks running text,
    the repeats a decoder loop keeps, the server VAD's silence): a changed
    constant leaves no sentence saying the old one."""
    import inspect

    from evoxtral_stream.audio.pipe import AHEAD_S, CLOCK_DRIFT
    from evoxtral_stream.audio.wavstream import MAX_FILE_RATE, MIN_FILE_RATE
    from evoxtral_stream.server.app import TLS_POLL_S
    from evoxtral_stream.text.formats import to_text
    from evoxtral_stream.text.loops import KEEP

    vad = tomllib.loads((ROOT / "config.toml").read_text())["vad"]
    stated = {
        r"any sample rate from (\d+) kHz to \d+ kHz": MIN_FILE_RATE / 1000,
        r"any sample rate from \d+ kHz to (\d+) kHz": MAX_FILE_RATE / 1000,
        r"more than (\d+(?:\.\d+)?) s ahead of the clock": AHEAD_S,
        r"ahead of the clock \(past what waited in the pipe while the model loaded, "
        r"and (\d+(?:\.\d+)?) % of the time since": CLOCK_DRIFT * 100,
        r"are picked up within (\d+) s": TLS_POLL_S,
        r"a new line after a silence of (\d+(?:\.\d+)?) s or more":
            inspect.signature(to_text).parameters["paragraph_gap_s"].default,
        r"is cut back to (\w+) repeats": KEEP,
        r"With server VAD, a turn ends after (half a) second of silence":
            vad["end_silence_ms"] / 1000,
    }
    wrong = [f"{pattern!r}: README.md {said:g}, the code {value:g}"
             for pattern, value in stated.items()
             if (said := _readme_number(pattern)) != value]
    assert not wrong, f"README.md states numbers the code does not hold: {wrong}"


# Options of other programs that the docs name: pip's and mypy's (README's
# note on Python 3.12 and 3.13).
_OTHER_PROGRAMS_OPTIONS = {"--python-version", "--only-binary", "--no-deps",
                           "--enable-error-code"}


def test_every_option_the_docs_name_exists() -> None:
    """Each ``--option`` README.md, clients/README.md, docs/protocol.md and
    docs/config.md name is an option of evoxtral-stream (a command's, or
    one before the command) or of a client, or of another program they
    name on purpose: a renamed or removed option leaves no command a user
    cannot run. (docs/voxtral.md and docs/systemd.md also name the
    benchmarks' and systemctl's options.)"""
    clients = ROOT / "clients"
    if str(clients) not in sys.path:
        sys.path.insert(0, str(clients))
    from evoxtral_stream.cli.parser import _parser

    parsers = [_parser()]
    (sub,) = [a for a in parsers[0]._actions if isinstance(a, argparse._SubParsersAction)]
    parsers += list(sub.choices.values())
    parsers += [importlib.import_module(n).build_parser()
                for n in ("viewer", "mic_client", "tts_bridge")]
    known = {opt for p in parsers for a in p._actions for opt in a.option_strings}
    assert {"--exit-at-end", "--compare-offline", "--since", "--voice"} <= known
    unknown = []
    for doc in (ROOT / "README.md", clients / "README.md", ROOT / "docs" / "protocol.md",
                ROOT / "docs" / "config.md"):
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", doc.read_text()))
        unknown += [f"{doc.relative_to(ROOT)}: {opt}"
                    for opt in sorted(named - known - _OTHER_PROGRAMS_OPTIONS)]
    assert not unknown, f"the docs name options nothing takes: {unknown}"
