// evoxtral-stream live captions page (protocol v1, see docs/protocol.md).
//
// One subscription to /v1/captions (all streams, or those ?streams=a,b
// names: what a token limited to some streams needs) feeds the page; the
// picker filters what is shown, so it lists every stream subscribed to. Each segment has
// one line: partials rewrite it in #partials, the final moves it into
// #finals (the aria-live log). On a disconnect the page reconnects with
// since=STREAM:SEQ for every stream it has seen (as many as a URL can hold:
// resumeSince), with epoch= from the last hello (a server restarted without
// its journal then replays its new numbering from seq 1), so no final is
// lost, and drops events it already has (seq <= last seen). The microphone button
// streams PCM16 from an AudioWorklet to /v1/ingest?stream=browser-XXXX (or
// the page's ?mic=ID, for a token limited to some streams), in the language
// picked beside it (offered when the server's hello lists more than one).
// At most MIC_BACKLOG_S of its audio is on its way: in a backlog while the
// ingest socket reconnects, or, on a link slower than the microphone, sent
// on the open socket and not yet acknowledged by the server (ingest.progress).
// Chunks past that are dropped, not queued, and their time is declared to
// the server as a lost message before the next chunk sent (see openIngest),
// so captions stay in time; the notice says so once per slow episode, and
// again with the count once it is over. The chunks sent on the open socket
// are kept until the server acknowledges them: when that connection is lost,
// those it never took (from half a second past its last acknowledgement on:
// on a link that stalled before it broke, audio that waited in the sockets)
// go first on the next one, within the same MIC_BACKLOG_S (see resendUnacked).
//
// Access tokens: a browser WebSocket cannot set headers, so both sockets
// carry the token as the subprotocol evoxtral.token.<TOKEN>. The token comes
// from the URL fragment (#token=...: fragments are never sent to the server,
// so it stays out of its logs), or from the form shown when the server
// refuses the page; it is kept in sessionStorage (this tab only) and removed
// from the visible URL.

const MAX_LINES = 300;
// Seconds of microphone audio on its way to the ingest connection: kept for
// the next connection while it is lost, or sent on the open one but not yet
// acknowledged by the server while the link is slower than the microphone.
// Past it, chunks are dropped and their time declared as lost audio, so the
// captions lag the microphone by at most about this much; it is about 1 MB
// at 48 kHz, and mic_client.py's queue holds as much. The server's
// acknowledgements, not bufferedAmount, are what bound a stalled link:
// Chromium's bufferedAmount leaves out what its network process has taken,
// and that takes without limit what a stalled TCP connection cannot send
// (over 10 MB in a test). bufferedAmount is still checked, for a server
// that does not acknowledge.
const MIC_BACKLOG_S = 10;
// Most bytes of since= a reconnect sends (resumeSince).
const RESUME_QUERY_BYTES = 4096;
// Seconds of audio the server acknowledges at a time (docs/protocol.md: it
// sends ingest.progress once it has taken sample_rate / 2 frames more): of a
// lost connection's audio, it may have taken up to this much past its last
// acknowledgement, and none of what was sent after that.
const ACK_STEP_S = 0.5;
const TOKEN_KEY = "evoxtral.token";
const TOKEN_PROTOCOL = "evoxtral.token.";
// What a subprotocol name may hold, as docs/protocol.md promises it for tokens
// (and secrets.token_urlsafe() makes them); WebSocket() rejects other names.
const TOKEN_CHARS = /^[A-Za-z0-9._~-]+$/;
// The known tag set, as evoxtral_stream.text.tags.TAG_TABLE has it (a test
// holds the two equal): per kind, each tag's canonical name, then the
// variants that mean it ("sighing" is "sighs"), each as normTag leaves it.
const TAG_TABLE = {
  "emotion": [
    "nervous|nervously", "excited|excitedly|excitement", "frustrated|frustration", "calm|calmly",
    "angry|angrily|anger", "sad|sadly|sadness", "scared|fearful|afraid|frightened", "emotional",
    "confused|confusion", "worried|worriedly", "curious|curiously", "curious tone",
    "serious|seriously", "happy|happily", "cheerful|cheerfully", "annoyed", "appalled",
    "thoughtful|thoughtfully", "surprised", "sarcastic|sarcastically",
    "mischievously|mischievous", "regretful", "resigned", "hesitant", "tired", "relieved",
    "hopeful", "anxious|anxiously", "disappointed", "embarrassed", "proud", "shocked",
    "disgusted", "determined", "bored", "sympathetic", "impatient", "panicked|panicking|panic",
  ],
  "non-verbal": [
    "sighs|sigh|sighing|sighed",
    "clears throat|clear throat|clearing throat|throat clearing|clears his throat|" +
      "clears her throat|clearing his throat|clearing her throat|throat clear",
    "laughs|laugh|laughing|laughter|laughed", "gasps|gasp|gasping|gasped", "yawns|yawn|yawning",
    "sniffles|sniffle|sniffling|sniffs|sniff", "giggles|giggle|giggling",
    "chuckles|chuckle|chuckling", "laughs harder", "starts laughing",
    "laughs nervously|nervous laughter|nervous laugh", "wheezing|wheezes",
    "snorts|snort|snorting", "coughs|cough|coughing", "sneezes|sneeze|sneezing",
    "exhales|exhale|exhaling", "exhales sharply", "inhales|inhale|inhaling", "inhales deeply",
    "swallows|swallow|swallowing", "gulps|gulp|gulping", "groans|groan|groaning",
    "sobs|sob|sobbing", "screams|scream|screaming", "scoffs|scoff|scoffing", "hums|hum|humming",
    "whistles|whistle|whistling", "slams door|door slams|door slam", "applause|applauding",
    "clapping|claps|clap", "music", "gunshot", "explosion",
  ],
  "delivery": [
    "whispers|whisper|whispering|whispered",
    "stammers|stammer|stammering|stutters|stutter|stuttering",
    "shouts|shout|shouting|shouted|yells|yell|yelling", "crying|cries|cry",
    "sings|singing|sing|sung", "mumbles|mumbling|mumble", "quietly|softly", "loudly",
    "rushed|quickly|fast", "slows down|slowly", "drawn out", "dramatically|dramatic", "deadpan",
    "flatly", "playfully|playful",
  ],
  "pause": [
    "pause|pauses|pausing|paused", "short pause", "long pause", "continues after a beat|beat",
    "hesitates|hesitation|hesitating",
  ],
};
// normTag's form of a known tag or variant -> {tag: its canonical name, kind}.
const KNOWN_TAGS = new Map(Object.entries(TAG_TABLE).flatMap(([kind, entries]) =>
  entries.flatMap((entry) => {
    const names = entry.split("|");
    return names.map((name) => [name, { tag: names[0], kind }]);
  })));
const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"), picker: $("picker"), mic: $("mic"), finals: $("finals"),
  partials: $("partials"), notice: $("notice"), backend: $("backend"),
  main: document.querySelector("main"), auth: $("auth"), token: $("token"),
  authWhy: $("auth-why"), language: $("language"), languageLabel: $("language-label"),
};
const params = new URLSearchParams(location.search);

// Exposed for the browser console and the end-to-end tests.
const state = window.evoxtral = {
  lastSeq: new Map(),   // stream -> highest seq the subscription delivered (resume point)
  epoch: null,          // the numbering those seqs are of (the last hello's)
  // stream -> {epoch, seqs}: seqs above lastSeq shown from the microphone
  // socket, of the numbering its ingest.ready named (see aheadOf)
  ahead: new Map(),
  streams: new Map(),   // stream -> {ended, seen, option}: the picker's entries (seen: known live)
  lines: new Map(),     // "stream\u0000segment" -> <p class="line">
  selected: params.get("stream") || "",
  micName: params.get("mic") || "",  // the microphone's stream id ("": browser-XXXX)
  // The streams subscribed to (empty: all of them).
  only: (params.get("streams") || "").split(",").filter((s) => s),
  languages: [],        // what the server's hello offers, its default first
  socket: null, url: null, connects: 0, retry: 0, fatal: false, mic: null,
  timer: null,          // the pending reconnect, if any
  token: "",            // the access token ("" for none)
  tokenError: "",       // why the last token given could not be used
  refused: null,        // {status, reason} while the server refuses the page's token
  // Seconds of lost audio one ingest connection takes at once, then no more
  // than real time (docs/protocol.md: the server refuses more as too fast).
  maxLostS: 600,
  knownTags: KNOWN_TAGS,  // the known tag set, for chips the server's tags do not name
};

// A server path relative to the page, as a ws:// (or wss://) URL.
function wsUrl(path) {
  const url = new URL(path, location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

// --- the access token ------------------------------------------------------------

function storedToken() {
  try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch { return ""; }  // storage off
}

// Use `token` from now on ("" for none). False, with the reason in
// state.tokenError, when a browser cannot send it (the token is unchanged).
function setToken(token) {
  token = token.trim();
  if (token && !TOKEN_CHARS.test(token)) {
    state.tokenError = "This token cannot be sent by a browser: a token for this page may " +
                       "hold only letters, digits and - _ . ~";
    return false;
  }
  state.token = token;
  state.tokenError = "";
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
  } catch { /* storage off: the token lasts until the page is left */ }
  return true;
}

// #token=TOKEN in the URL: take it, and take it out of the URL (and so out
// of the history, bookmarks and screen). null when there is none, else
// whether it can be used.
function tokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (token === null) return null;
  params.delete("token");
  const url = new URL(location.href);
  url.hash = params.toString();
  history.replaceState(null, "", url);
  if (setToken(token)) return true;
  showAuth(state.tokenError);
  return false;
}

// The subprotocols that carry the token (none without one).
function protocols() {
  return state.token ? [TOKEN_PROTOCOL + state.token] : [];
}

// Why a WebSocket handshake failed. The browser tells a script nothing
// about it (close code 1006), so ask for the same path over plain HTTP,
// with the same token as a header: the server answers that request's
// access check exactly as the handshake's. {status, reason} for a 401 or
// 403, else null (the server is unreachable, or the failure was another);
// `origin` when the page's own origin was refused (no token helps then).
// A same-origin GET carries no Origin header, so the page names its origin
// in Evoxtral-Origin for the server to check as the handshake's.
// Bounded, so a server that accepts connections but never answers cannot
// hold off the reconnect that waits for this.
async function refusal(path) {
  try {
    const headers = { "Evoxtral-Origin": location.origin };
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    const r = await fetch(new URL(path, location.href),
                          { headers, cache: "no-store", signal: AbortSignal.timeout(5000) });
    if (r.status === 401 || r.status === 403) {
      const reason = (await r.text()).trim().split("\n")[0];
      return { status: r.status, reason, origin: r.status === 403 && reason.startsWith("origin ") };
    }
  } catch { /* unreachable: not a refusal */ }
  return null;
}

const ORIGIN_REFUSED = "access refused: this page's origin is not allowed";

function showAuth(why) {
  ui.authWhy.textContent = why;
  ui.auth.hidden = false;
  ui.token.value = "";
  ui.token.focus();
}

function hideAuth() {
  ui.auth.hidden = true;
  ui.authWhy.textContent = "";
}

// --- rendering --------------------------------------------------------------

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function normTag(name) {
  // Mirrors evoxtral_stream.text.tags.normalize_tag_name.
  return name.normalize("NFKC").toLowerCase().replace(/[_-]/g, " ").split(/\s+/)
    .filter(Boolean).join(" ").replace(/^[.,;:!?*() ]+|[.,;:!?*() ]+$/g, "");
}

// A tag's canonical name, as evoxtral_stream.text.tags.lookup_tag gives it:
// that of the known tag it names or is a variant of, else its normTag form.
function canonicalTag(name) {
  const norm = normTag(name);
  return KNOWN_TAGS.get(norm)?.tag ?? norm;
}

function formatTime(s) {
  const t = Math.round(s * 10), m = Math.floor(t / 600);
  return `${m}:${((t % 600) / 10).toFixed(1).padStart(4, "0")}`;
}

// A tag in tagged text: brackets around something that is not blank and
// holds no digit (evoxtral_stream.text.tags.holds_digit: "[1]", "array[0]"
// are text).
function tagsIn(text) {
  return [...text.matchAll(/\[([^\[\]]*)\]/g)]
    .filter((m) => m[1].trim() && !/\p{Nd}/u.test(m[1].normalize("NFKC")));
}

// The kind of each tag chip of `texts` (the caption's text, or its stable and
// unstable parts), in order. The server parsed the text: its `tags` are the
// text's tags in order, each with its canonical name and kind, however the
// text spells it (an alias: "[sighing]" is "sighs"). Text whose tags do not
// line up with them (another server's, which leaves some out or counts
// "(laughs)" as one; a stable/unstable cut inside a tag) takes the kind of
// the tag of the same canonical name, else the known tag set's.
function chipKinds(ev, texts) {
  const found = texts.flatMap(tagsIn);
  const tags = Array.isArray(ev.tags) ? ev.tags : [];
  if (found.length === tags.length) return tags.map((t) => t.kind);
  const byName = new Map(tags.map((t) => [canonicalTag(t.tag), t.kind]));
  return found.map((m) => {
    const name = canonicalTag(m[1]);
    return byName.get(name) ?? KNOWN_TAGS.get(name)?.kind;
  });
}

// Tagged text as nodes: tags become chips coloured by kind (taken in turn
// from `kinds`, an iterator); brackets stay in the text for copy-paste and
// screen readers, hidden from sight.
function renderTagged(text, kinds, unstable) {
  const out = [];
  let pos = 0;
  for (const m of tagsIn(text)) {
    if (m.index > pos) out.push(el("span", unstable ? "unstable" : "", text.slice(pos, m.index)));
    const chip = el("span", unstable ? "tag unstable" : "tag");
    const kind = kinds.next().value || "unknown";
    chip.dataset.kind = kind;
    chip.title = kind;
    chip.append(el("span", "sr", "["), m[1].trim(), el("span", "sr", "]"));
    out.push(chip);
    pos = m.index + m[0].length;
  }
  if (pos < text.length) out.push(el("span", unstable ? "unstable" : "", text.slice(pos)));
  return out;
}

function fillLine(line, ev) {
  const text = line.querySelector(".text");
  if (ev.final || ev.stable + ev.unstable !== ev.text) {
    const kinds = chipKinds(ev, [ev.text]).values();
    text.replaceChildren(...renderTagged(ev.text, kinds, !ev.final));
  } else {
    const kinds = chipKinds(ev, [ev.stable, ev.unstable]).values();
    text.replaceChildren(...renderTagged(ev.stable, kinds, false),
                         ...renderTagged(ev.unstable, kinds, true));
  }
  line.querySelector("time").textContent = formatTime(ev.start);
  line.classList.toggle("final", ev.final);
  line.classList.toggle("partial", !ev.final);
  // A partial with no text (the segment rated no speech so far): not shown,
  // rather than a time with nothing after it; its next text shows it again.
  line.classList.toggle("empty", !ev.text);
  // A caption of the segment after a failed decode (markFailed): it went on.
  line.classList.remove("failed");
  line.querySelector(".flag")?.remove();
}

// The partial line of a segment whose decode failed keeps the text it
// shows, with the error beside it: the segment goes on, and its next
// caption (the next partial, or after a failed final the final that
// closes the segment with this text: docs/protocol.md) takes the mark off.
function markFailed(line, msg) {
  let flag = line.querySelector(".flag");
  if (!flag) line.append(flag = el("span", "flag"));
  flag.textContent = `⚠ ${msg.code}`;
  flag.title = msg.message ?? "";
  line.classList.add("failed");
}

function newLine(stream, cls) {
  const line = el("p", `line ${cls}`);
  line.dataset.stream = stream;
  line.hidden = Boolean(state.selected) && state.selected !== stream;
  return line;
}

function appendFinal(node) {
  const stick = ui.main.scrollTop + ui.main.clientHeight >= ui.main.scrollHeight - 40;
  ui.finals.append(node);
  while (ui.finals.childElementCount > MAX_LINES) {
    dropLine(ui.finals.firstElementChild);
  }
  if (stick) ui.main.scrollTop = ui.main.scrollHeight;
}

function note(stream, text) {
  const line = newLine(stream, "note");
  line.textContent = text;
  appendFinal(line);
}

// Later captions of `stream` start new lines: the lines shown stay, but no
// caption of a new numbering may rewrite them. Lines for which `keep` is
// true are left as they are.
function forgetSegments(stream, keep = () => false) {
  for (const [key, line] of state.lines) {
    if (line.dataset.stream !== stream || keep(line)) continue;
    if (line.parentNode === ui.partials) line.remove();  // its segment will never end
    state.lines.delete(key);
  }
}

function dropLine(line) {
  // A line of a forgotten segment (forgetSegments) no longer owns its key:
  // a later run's line of the same segment may hold it now.
  if (state.lines.get(line.dataset.key) === line) state.lines.delete(line.dataset.key);
  line.remove();
}

// The partial lines of `stream`, whose segments will get no final: but a
// partial the microphone socket showed ahead of the subscription (its seq
// still ahead) is the next run's, whose stream.started is still to come.
function dropPartials(stream) {
  const ahead = aheadOf(stream);
  for (const line of [...ui.partials.children]) {
    if (line.dataset.stream === stream && !ahead.has(Number(line.dataset.seq))) dropLine(line);
  }
}

function showNotice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = !text;
}

// --- streams and the picker ---------------------------------------------------

// `seen`: the server said the stream exists (a hello, its events); false
// for a stream only named by the page (?stream=, the microphone's).
function addStream(name, ended = false, seen = true) {
  let info = state.streams.get(name);
  if (!info) {
    info = { ended, seen, endNoted: false, option: new Option(name, name) };
    state.streams.set(name, info);
    ui.picker.append(info.option);
    if (name === state.selected) ui.picker.value = name;
  }
  info.seen ||= seen;
  info.ended = ended;
  info.option.textContent = ended ? `${name} (ended)` : name;
}

function select(name) {
  state.selected = name;
  ui.picker.value = name;
  document.body.classList.toggle("all", !name);
  for (const line of document.querySelectorAll(".line")) {
    line.hidden = Boolean(name) && line.dataset.stream !== name;
  }
  const url = new URL(location.href);
  if (name) url.searchParams.set("stream", name); else url.searchParams.delete("stream");
  history.replaceState(null, "", url);
}

// --- events -------------------------------------------------------------------

// Whether the caption subscription receives `name`'s events.
function subscribed(name) {
  return !state.only.length || state.only.includes(name);
}

// The seqs of `stream` that the microphone socket showed ahead of the
// subscription, if they are of the subscription's numbering: those from
// another run of the server say nothing about the seqs it delivers.
function aheadOf(stream) {
  const ahead = state.ahead.get(stream);
  return ahead && ahead.epoch === state.epoch ? ahead.seqs : new Set();
}

function onCaption(ev, viaMic = false) {
  // The microphone socket may be on a restarted server already, whose
  // numbering the subscription has not seen yet (its hello is still to
  // come): its seqs are not compared with the subscription's then.
  const epoch = viaMic ? state.mic?.epoch ?? null : state.epoch;
  const sameRun = epoch === state.epoch;
  if (sameRun && ev.seq <= (state.lastSeq.get(ev.stream) || 0)) return;  // replayed or duplicate
  if (subscribed(ev.stream)) {
    // Only the subscription moves the resume point: while it reconnects, the
    // microphone socket's captions come first, and the server may still owe
    // it captions below them. Those shown ahead are remembered, so neither
    // socket shows a caption twice.
    if (viaMic) {
      let ahead = state.ahead.get(ev.stream);
      if (ahead?.epoch !== epoch) state.ahead.set(ev.stream, ahead = { epoch, seqs: new Set() });
      if (ahead.seqs.has(ev.seq)) return;
      ahead.seqs.add(ev.seq);
    } else {
      state.lastSeq.delete(ev.stream);  // kept in order of activity (resumeSince)
      state.lastSeq.set(ev.stream, ev.seq);
      const ahead = aheadOf(ev.stream);
      const shown = ahead.has(ev.seq);
      for (const seq of ahead) if (seq <= ev.seq) ahead.delete(seq);
      if (shown) return;
    }
  }
  if (!state.streams.has(ev.stream)) addStream(ev.stream);
  else state.streams.get(ev.stream).seen = true;
  state.streams.get(ev.stream).endNoted = false;  // a caption after an end: the next run
  const key = `${ev.stream}\u0000${ev.segment}`;
  let line = state.lines.get(key);
  if (line?.classList.contains("final")) {
    // A segment's final is its last event: this is a new session of the
    // stream id whose stream.started we missed (it came while we were away).
    forgetSegments(ev.stream);
    line = undefined;
  }
  if (!line) {
    line = newLine(ev.stream, "partial");
    line.dataset.key = key;
    line.dataset.segment = ev.segment;
    const meta = el("span", "meta");
    meta.append(el("span", "who", ev.stream), el("time"));
    line.append(meta, el("span", "text"));
    state.lines.set(key, line);
  }
  fillLine(line, ev);
  line.dataset.seq = ev.seq;
  if (ev.final) {
    if (!ev.text) { dropLine(line); return; }
    appendFinal(line);  // moves it out of #partials: the final replaces its partials
  } else if (line.parentNode !== ui.partials) {
    ui.partials.append(line);
  }
}

function handle(msg, viaMic = false) {
  switch (msg.type) {
    case "hello":
      if (msg.v !== 1) {
        state.fatal = true;
        showNotice(`This page speaks protocol v1; the server speaks v${msg.v}. Reload the page.`);
        state.socket.close();
        return;
      }
      ui.backend.textContent = `${msg.server} ${msg.version} · ${msg.backend}`;
      if (typeof msg.epoch === "string") {
        const renumbered = state.epoch !== null && msg.epoch !== state.epoch;
        state.epoch = msg.epoch;
        if (renumbered) {
          // A new numbering (a restart without the journal): no seq we hold
          // means anything now, those left out of the URL included. The
          // streams in it also get a gap with no end (handled below).
          for (const name of state.lastSeq.keys()) state.lastSeq.set(name, 0);
          for (const [name, info] of state.streams) {
            // The old server's open segments never end: forgotten here, not
            // only at that gap, which a link lost right after this hello
            // never brings (a resume from 0 of this numbering gets none).
            // What the microphone socket showed of this numbering stays.
            // The ends to come are of this numbering's runs: none noted yet.
            const ahead = aheadOf(name);
            forgetSegments(name, (line) => ahead.has(Number(line.dataset.seq)));
            info.endNoted = false;
          }
        }
      }
      showLanguages(msg.languages || []);
      for (const name of msg.streams) {
        if (subscribed(name)) addStream(name);
      }
      // A stream we followed that is no longer open ended while we were away
      // (a resume replays its stream.ended too while the server retains it,
      // which adds the note).
      if (state.connects > 1) {
        for (const [name, info] of state.streams) {
          if (!info.ended && info.seen && !msg.streams.includes(name)) {
            addStream(name, true);
            // Its open segments get no final (a stream cut by a crash has no
            // recorded end); a replay still to come brings what it retained.
            dropPartials(name);
          }
        }
      }
      return;
    case "stream.started": {
      // A stream id used again counts its segments from 0: its earlier runs'
      // lines take no more captions. The subscription brings a run's
      // stream.started before its captions, but the microphone socket may
      // have shown some of them first: those (seqs still ahead) are this
      // run's, and stay.
      const ahead = aheadOf(msg.stream);
      forgetSegments(msg.stream, (line) => ahead.has(Number(line.dataset.seq)));
      addStream(msg.stream);
      state.streams.get(msg.stream).endNoted = false;
      return;
    }
    case "stream.ended": {
      addStream(msg.stream, true);
      dropPartials(msg.stream);  // the run's segments that never got a final
      // A resume replays the end of every ended stream it names: noted once.
      const info = state.streams.get(msg.stream);
      if (info.endNoted) return;
      info.endNoted = true;
      note(msg.stream, `${msg.stream} ended · ${msg.finals} captions, ${msg.duration.toFixed(1)} s`);
      return;
    }
    case "caption": onCaption(msg, viaMic); return;
    case "gap":
      note(msg.stream, msg.to === null
        ? `${msg.stream}: the server cannot place caption ${msg.from} (it restarted, or forgot the stream); showing all it has`
        : `${msg.stream}: captions ${msg.from}–${msg.to} are no longer available`);
      if (msg.to === null) {
        // The server cannot place our seq (it restarted without its journal):
        // what follows may be numbered anew. Resume from 0, not without since=,
        // in case the link drops before it comes. What the microphone socket
        // showed of this server's numbering (its epoch, when both name one)
        // stays shown: the replay brings it again, and it is skipped then.
        state.lastSeq.set(msg.stream, 0);
        const ahead = state.epoch === null ? new Set() : aheadOf(msg.stream);
        if (!ahead.size) state.ahead.delete(msg.stream);
        forgetSegments(msg.stream, (line) => ahead.has(Number(line.dataset.seq)));
      }
      return;
    case "error":
      if (msg.stream != null && msg.segment != null) {  // a decode of that segment failed
        // Its partial stays, marked; not a final already shown: the
        // microphone socket may have brought the error and the closing
        // final after it before the subscription.
        const line = state.lines.get(`${msg.stream}\u0000${msg.segment}`);
        if (line && !line.classList.contains("final")) markFailed(line, msg);
      }
      if (msg.stream) note(msg.stream, `${msg.stream}: ${msg.code}: ${msg.message}`);
      else showNotice(`${msg.code}: ${msg.message}`);
      return;
    default:
  }
}

function parse(data) {
  try { return JSON.parse(data); } catch { return null; }
}

// --- the caption subscription, with resume ------------------------------------------

// The resume points a reconnect sends: not every stream ever seen, as a
// server refuses a URL past about 8 KB (HTTP 414) and a browser microphone
// is a new stream each time, but the live streams first, then those that
// ended, each the most recently active first, as many as fit in
// RESUME_QUERY_BYTES (as the viewer and the TTS bridge do).
function resumeSince() {
  const latestFirst = [...state.lastSeq].reverse();
  const ended = ([name]) => Boolean(state.streams.get(name)?.ended);
  const items = [];
  let size = 0;
  for (const [name, seq] of [...latestFirst.filter((e) => !ended(e)),
                             ...latestFirst.filter(ended)]) {
    const item = `${encodeURIComponent(name)}:${seq}`;
    if (size + item.length + 1 > RESUME_QUERY_BYTES) break;
    size += item.length + 1;
    items.push(item);
  }
  return items.join(",");
}

function connect() {
  state.timer = null;
  const since = resumeSince();
  const query = [];
  if (state.only.length) query.push(`stream=${state.only.map(encodeURIComponent).join(",")}`);
  if (since) query.push(`since=${since}`);
  if (since && state.epoch !== null) query.push(`epoch=${encodeURIComponent(state.epoch)}`);
  const path = `v1/captions${query.length ? `?${query.join("&")}` : ""}`;
  state.url = wsUrl(path);
  const ws = new WebSocket(state.url, protocols());
  let opened = false;
  state.socket = ws;
  state.connects += 1;
  ws.onopen = () => {
    opened = true;
    state.retry = 0;
    state.refused = null;
    hideAuth();
    // A token the page could not use is still said (in the notice: the form
    // is gone), but it is stale from now on: a later refusal must show the
    // server's reason, not this.
    if (state.tokenError) showNotice(`The token given was not used. ${state.tokenError}`);
    state.tokenError = "";
    ui.status.textContent = "live";
    ui.status.className = "live";
  };
  ws.onmessage = (e) => { const msg = parse(e.data); if (msg) handle(msg); };
  ws.onclose = async () => {
    if (state.socket !== ws || state.fatal) return;
    const refused = opened ? null : await refusal(path);
    if (state.socket !== ws) return;  // a new token came meanwhile
    if (refused?.origin) {
      // No token helps, and retrying would be refused again.
      state.refused = refused;
      ui.status.textContent = ORIGIN_REFUSED;
      ui.status.className = "refused";
      showNotice(`The server said: ${refused.reason}`);
      return;
    }
    if (refused) {
      // Retrying would be refused again: wait for another token instead.
      state.refused = refused;
      ui.status.textContent = "access refused: token missing or not accepted";
      ui.status.className = "refused";
      showAuth(state.tokenError || (refused.status === 401 && !state.token
        ? "The server needs an access token: paste it here, or open this page with " +
          "#token=TOKEN at the end of its address."
        : `The server said: ${refused.reason}`));
      return;
    }
    const delay = Math.min(5000, 250 * 2 ** state.retry++);
    ui.status.textContent = "reconnecting…";
    ui.status.className = "";
    state.timer = setTimeout(connect, delay);
  };
}

// Connect again now, with the current token (a new one from the form or the URL).
function restart() {
  clearTimeout(state.timer);
  const old = state.socket;
  state.socket = null;  // its onclose must not reconnect too
  old?.close();
  state.retry = 0;
  ui.status.textContent = "connecting…";
  ui.status.className = "";
  connect();
}

// --- the microphone ---------------------------------------------------------------

async function startMic() {
  if (!navigator.mediaDevices?.getUserMedia || !window.AudioWorkletNode) {
    showNotice("The microphone needs a secure page: open it over https or on localhost.");
    return;
  }
  ui.mic.disabled = true;
  showNotice("");
  let media, ctx;
  try {
    media = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false },
    });
    ctx = new AudioContext();
    await ctx.audioWorklet.addModule("static/worklet.js");
  } catch (e) {
    media?.getTracks().forEach((t) => t.stop());
    ctx?.close();
    ui.mic.disabled = false;
    showNotice(`Cannot use the microphone: ${e.message || e}`);
    return;
  }
  const id = [...crypto.getRandomValues(new Uint8Array(2))]
    .map((b) => b.toString(16).padStart(2, "0")).join("");
  const stream = state.micName || `browser-${id}`;
  // Downmixed to one channel by the graph; 50 ms messages.
  const node = new AudioWorkletNode(ctx, "pcm16-capture", {
    numberOfInputs: 1, numberOfOutputs: 1, channelCount: 1,
    channelCountMode: "explicit", channelInterpretation: "speakers",
    processorOptions: { chunkFrames: Math.round(ctx.sampleRate / 20) },
  });
  const mic = state.mic = {
    stream, media, ctx, node, ws: null, sampleRate: ctx.sampleRate, sent: 0,
    language: ui.language.value, before: state.selected, opened: false, connects: 0,
    epoch: null,         // the numbering of the seqs its connection's captions carry
    retry: 0, timer: null, backlog: [], backlogBytes: 0, dropped: 0, lastError: null,
    lost: 0,             // frames dropped since the last chunk kept (sent or in the backlog)
    slow: 0,             // chunks dropped since the open socket's audio went over the bound
    framesSent: 0,       // frames sent on this connection
    framesAcked: null,   // of them, what its server acknowledged; null: it does not
    // The chunks sent on this connection and not acknowledged, each with
    // framesSent at its end (kept only while the server acknowledges).
    inFlight: [],
    resending: 0,        // frames at the backlog's head sent again (resendUnacked)
    resent: 0,           // frames sent again over all connections
    captured: 0,         // frames the microphone delivered
    sentAudio: false,    // this connection has sent audio: its stream's timeline has begun
    allowance: 0, allowanceAt: 0,  // frames this connection still takes as lost, and when
    declared: 0, undeclared: 0,    // frames declared lost, and past what a connection takes
  };
  // Each chunk is PCM16 mono: byteLength / 2 frames at the config's sample_rate.
  const bound = MIC_BACKLOG_S * mic.sampleRate * 2;  // bytes
  node.port.onmessage = (e) => {
    mic.captured += e.data.byteLength / 2;
    if (mic.ws?.readyState === WebSocket.OPEN && mic.ready) {
      // On its way: sent and not acknowledged (bufferedAmount is part of it),
      // or, from a server that does not acknowledge, what bufferedAmount shows.
      const unacked = mic.framesAcked === null ? 0 : (mic.framesSent - mic.framesAcked) * 2;
      if (Math.max(unacked, mic.ws.bufferedAmount) + e.data.byteLength > bound) {
        // The link is slower than the microphone: drop, as beyond the backlog.
        if (!mic.slow++) {
          showNotice("Microphone: the connection is too slow; audio is dropped until it " +
                     "catches up (its time is sent as lost audio)");
        }
        mic.lost += e.data.byteLength / 2;
        return;
      }
      if (mic.slow) {
        // Before the chunk: a lost message past what the connection takes says so.
        showNotice(`Microphone: the connection caught up (${mic.slow} audio chunks ` +
                   "dropped meanwhile; their time is sent as lost audio)");
        mic.slow = 0;
      }
      sendAudio(mic, mic.lost, e.data);
      mic.lost = 0;
    } else if (mic.backlogBytes + e.data.byteLength <= bound) {
      // Kept for the next connection, with the frames dropped just before it.
      mic.backlog.push({ lost: mic.lost, chunk: e.data });
      mic.backlogBytes += e.data.byteLength;
      mic.lost = 0;
    } else {
      mic.dropped += 1;
      mic.lost += e.data.byteLength / 2;
    }
  };
  ctx.createMediaStreamSource(media).connect(node);
  node.connect(ctx.destination);  // silent output keeps the node pulled
  openIngest(mic);
  addStream(stream, false, false);
  select(stream);
  setMicButton(true);
}

// One chunk on the microphone's accepted connection, after a lost message
// for the `lost` frames dropped just before it. Frames dropped before a
// connection's first chunk are not declared: they lie between its stream and
// the one before (each connection's stream has a timeline of its own, from
// its first audio).
function sendAudio(mic, lost, chunk) {
  const declared = lost && mic.sentAudio ? declareLost(mic, lost) : 0;
  mic.ws.send(chunk);
  mic.sent += chunk.byteLength;
  mic.framesSent += chunk.byteLength / 2;
  mic.sentAudio = true;
  if (mic.framesAcked !== null) {
    mic.inFlight.push({ end: mic.framesSent, chunk, declared });
    forgetAcked(mic);
  }
}

// Drop the chunks the server has acknowledged from those kept for a resend.
function forgetAcked(mic) {
  while (mic.inFlight.length && mic.inFlight[0].end <= mic.framesAcked) mic.inFlight.shift();
}

// The connection was lost before its summary: the audio sent on it from
// half a second past its last acknowledgement on never reached the server
// (on a link that stalled before it broke, it waited in the sockets, up to
// MIC_BACKLOG_S of it), and goes first on the next connection, ahead of
// what was captured meanwhile. The server may have taken that half second
// unacknowledged: sending it again would give it that audio twice. The lost
// frames declared before each of its chunks but the first are declared
// again before it: the server took none of that audio, and so none of the
// lost messages between it either (the first one's it may have taken). The
// backlog stays within MIC_BACKLOG_S: past it, its latest chunks are
// dropped and declared as any dropped meanwhile.
function resendUnacked(mic) {
  const bound = MIC_BACKLOG_S * mic.sampleRate * 2;  // bytes, as in startMic
  const start = mic.framesAcked + Math.ceil(mic.sampleRate * ACK_STEP_S);
  const again = [];
  let bytes = 0;
  for (const { end, chunk, declared } of mic.inFlight) {
    if (end <= start) continue;
    const frames = chunk.byteLength / 2;
    const part = chunk.slice(Math.max(0, start - (end - frames)) * 2);
    again.push({ lost: again.length ? declared : 0, chunk: part });
    bytes += part.byteLength;
  }
  mic.inFlight = [];
  mic.backlog.unshift(...again);
  mic.backlogBytes += bytes;
  mic.resending += bytes / 2;
  mic.resent += bytes / 2;
  while (mic.backlogBytes > bound) {
    const { lost, chunk } = mic.backlog.pop();
    mic.backlogBytes -= chunk.byteLength;
    mic.lost += lost + chunk.byteLength / 2;
    mic.dropped += 1;
  }
}

// Tell the server `frames` were lost here, as far as the connection takes
// them (state.maxLostS at once, then real time); the rest is said in the
// notice. Returns the frames declared.
function declareLost(mic, frames) {
  const now = performance.now() / 1000;
  mic.allowance = Math.min(state.maxLostS * mic.sampleRate,
                           mic.allowance + (now - mic.allowanceAt) * mic.sampleRate);
  mic.allowanceAt = now;
  const n = Math.min(frames, Math.floor(mic.allowance));
  if (n) {
    mic.ws.send(JSON.stringify({ type: "lost", samples: n }));
    mic.allowance -= n;
    mic.declared += n;
  }
  if (n < frames) {
    mic.undeclared += frames - n;
    showNotice(`Microphone: ${((frames - n) / mic.sampleRate).toFixed(1)} s of lost audio ` +
               `were more than the server takes at once (${state.maxLostS} s): the captions ` +
               "after them come that much early");
  }
  return n;
}

// One ingest connection of the microphone's stream. Once the server has
// accepted the stream, a lost connection is opened again under the same id
// (backoff as for the captions) while the capture goes on: up to
// MIC_BACKLOG_S of audio waits for it and is sent first, later chunks are
// dropped and counted, and their time is declared lost before the next
// chunk sent (sendAudio), so the server puts silence there and the later
// captions keep their true times. While the connection is open, the same
// bound holds the audio on its way: the config asks the server to
// acknowledge the frames it has taken (ingest.progress, every 0.5 s of
// them), and a chunk that would take the frames sent but not acknowledged
// (or, without acknowledgements, bufferedAmount) past MIC_BACKLOG_S of audio
// is dropped and declared the same way, until the server has caught up
// (startMic). Each connection counts its frames from 0, as the server does.
// The chunks sent and not yet acknowledged are kept: when the connection is
// lost before its summary, those the server never took go at the head of the
// backlog (resendUnacked), so a link that stalled before it broke loses at
// most the half second the server may have taken unacknowledged, not all the
// audio that waited in the sockets; the notice says how much goes again.
// A refusal for a passing reason is retried too.
function openIngest(mic) {
  const path = `v1/ingest?stream=${encodeURIComponent(mic.stream)}`;
  const ws = mic.ws = new WebSocket(wsUrl(path), protocols());
  ws.binaryType = "arraybuffer";
  mic.ready = false;
  mic.connects += 1;
  let connected = false;
  ws.onopen = () => {
    connected = true;
    const config = { type: "config", sample_rate: mic.sampleRate, channels: 1, format: "pcm16",
                     progress: true };
    // The default is left out: an older server, or one that lists no languages.
    if (mic.language && mic.language !== state.languages[0]) config.language = mic.language;
    ws.send(JSON.stringify(config));
    ui.mic.disabled = false;
  };
  ws.onmessage = (e) => {
    const msg = parse(e.data);
    if (!msg) return;
    if (msg.type === "ingest.ready") {
      const back = mic.opened;
      mic.opened = mic.ready = true;
      mic.retry = 0;
      // The numbering of this connection's seqs (null: a server older than epochs).
      mic.epoch = typeof msg.epoch === "string" ? msg.epoch : null;
      mic.dropped += mic.slow;  // a slow episode that ended with its connection
      mic.slow = 0;
      mic.sentAudio = false;
      mic.framesSent = 0;
      mic.inFlight = [];
      // An older server leaves progress out (and sends no acknowledgements).
      mic.framesAcked = msg.progress === true ? 0 : null;
      mic.allowance = state.maxLostS * mic.sampleRate;
      mic.allowanceAt = performance.now() / 1000;
      if (back) {
        const what = [];
        if (mic.resending) {
          what.push(`${(mic.resending / mic.sampleRate).toFixed(1)} s of audio that did not ` +
                    "reach the server before the connection was lost sent again");
        }
        if (mic.dropped) {
          what.push(`${mic.dropped} audio chunks dropped meanwhile; their time is sent as ` +
                    "lost audio");
        }
        showNotice(what.length ? `Microphone: reconnected (${what.join("; ")})` : "");
        mic.dropped = 0;
        mic.resending = 0;
      }
      for (const { lost, chunk } of mic.backlog) sendAudio(mic, lost, chunk);
      mic.backlog = [];
      mic.backlogBytes = 0;
    } else if (msg.type === "ingest.progress") {
      if (mic.ws === ws && mic.framesAcked !== null) {
        mic.framesAcked = msg.frames;
        forgetAcked(mic);
      }
    } else if (msg.type === "ingest.summary") mic.summary = msg;
    else if (msg.type === "error" && msg.stream === mic.stream) {
      mic.lastError = msg.code;
      showNotice(`${msg.code}: ${msg.message}`);
    } else if (msg.type === "caption") {
      handle(msg, true);  // in case the subscription is reconnecting
    } else if (!msg.stream || !subscribed(mic.stream)) {
      // A refusal; or the stream's own events, which the subscription
      // otherwise brings (handled twice, an end would be noted twice).
      handle(msg);
    }
  };
  ws.onclose = async (e) => {
    if (mic.ws !== ws) return;
    if (mic.opened && !mic.ending && ingestRetryable(e.code, mic.lastError)) {
      mic.lastError = null;
      mic.ready = false;
      if (mic.framesAcked !== null) resendUnacked(mic);
      const delay = Math.min(5000, 250 * 2 ** mic.retry++);
      showNotice(`Microphone: connection lost (code ${e.code}); reconnecting…`);
      mic.timer = setTimeout(() => openIngest(mic), delay);
      return;
    }
    stopCapture(mic);
    setMicButton(false);
    if (mic.opened) return;
    // The stream never started: forget it, and say why unless the user stopped it.
    state.streams.get(mic.stream)?.option.remove();
    state.streams.delete(mic.stream);
    if (state.selected === mic.stream) select(mic.before);
    if (mic.ending || connected) return;  // connected: the server's error event said why
    const refused = await refusal(path);
    showNotice(refused
      ? `Microphone: ${refused.origin ? ORIGIN_REFUSED : "access refused: token missing or not accepted"} (${refused.reason})`
      : "Microphone: cannot connect to the server");
  };
}

// Close codes after which the microphone's stream is reconnected: the server
// went away or restarted, the connection failed, or the server asked to try
// later; after a refusal (1008), only a passing reason.
const INGEST_RETRY_CODES = new Set([1001, 1006, 1011, 1012, 1013, 1014]);
const INGEST_RETRY_ERRORS = new Set(
  ["stream_busy", "too_many_streams", "shutting_down", "idle_timeout"]);
function ingestRetryable(code, error) {
  if (code === 1008) return INGEST_RETRY_ERRORS.has(error);
  return INGEST_RETRY_CODES.has(code);
}

// The microphone's language picker: shown when the server offers a choice,
// its default first; a choice made survives a reconnect's new hello.
function showLanguages(languages) {
  state.languages = languages;
  const chosen = ui.language.value;
  ui.language.replaceChildren(...languages.map((code, i) => {
    const option = new Option(i === 0 ? `${code} (default)` : code, code);
    option.selected = code === chosen;
    return option;
  }));
  ui.languageLabel.hidden = languages.length < 2;
}

function stopCapture(mic) {
  if (mic.stopped) return;
  mic.stopped = true;
  mic.media.getTracks().forEach((t) => t.stop());
  mic.node.disconnect();
  mic.ctx.close();
}

function stopMic() {
  const mic = state.mic;
  mic.ending = true;
  stopCapture(mic);
  clearTimeout(mic.timer);
  if (mic.ws.readyState === WebSocket.OPEN && mic.ready) {
    if (mic.lost && mic.sentAudio) declareLost(mic, mic.lost);  // dropped after the last chunk
    mic.lost = 0;
    // The server flushes the open segment, sends the final and closes the socket.
    mic.ws.send(JSON.stringify({ type: "end" }));
    ui.mic.disabled = true;
    ui.mic.textContent = "Finishing…";
    return;
  }
  // No connection the server has accepted: nothing more reaches it.
  // The backlog and every chunk dropped before, after and between its chunks.
  const unsent = mic.backlogBytes / 2 + mic.lost +
                 mic.backlog.reduce((sum, { lost }) => sum + lost, 0);
  if (mic.opened && unsent) {
    const seconds = (unsent / mic.sampleRate).toFixed(1);
    showNotice(`Microphone stopped while reconnecting: ${seconds} s of audio were not sent`);
  }
  mic.ws.close();  // its onclose, if still to come, forgets a stream never started
  setMicButton(false);
}
function setMicButton(on) {
  ui.mic.disabled = false;
  ui.mic.classList.toggle("on", on);
  ui.mic.textContent = on ? "Stop microphone" : "Start microphone";
}

ui.mic.addEventListener("click", () => {
  if (ui.mic.classList.contains("on")) stopMic(); else startMic();
});
ui.picker.addEventListener("change", () => select(ui.picker.value));
ui.auth.addEventListener("submit", (e) => {
  e.preventDefault();
  if (setToken(ui.token.value)) { hideAuth(); restart(); } else showAuth(state.tokenError);
});
// A #token= pasted into the address bar of the open page does not reload it.
window.addEventListener("hashchange", () => { if (tokenFromFragment()) restart(); });
// The tab's stored token, unless the URL brings another: one the page cannot
// use is reported, and the stored token stays in use.
setToken(storedToken());
tokenFromFragment();
if (state.selected) { addStream(state.selected, false, false); select(state.selected); }
connect();
