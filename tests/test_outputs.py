"""transcribe's output files, written as the engine runs, against what the
whole run's events give (how transcribe wrote them before: all at the end).

Real speech (espeak-ng), the embedded Whisper model, the real engine; and
the files alone, fed events by hand.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.backends.base import Backend
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import CaptionEvent, EngineEvent, StreamEnded
from evoxtral_stream.outputs import JsonlFile, SubtitleFiles, part_path, write_file
from evoxtral_stream.run import FileJob, transcribe_samples
from evoxtral_stream.server.protocol import event_to_dict
from evoxtral_stream.text.formats import CueLayout, SubtitleWriter, TagStyle, to_srt, to_vtt
from tests.speech import have_espeak, speech_with_pauses

_TALKS = {
    "a": ["The committee met on Tuesday to discuss the budget for next year.",
          "Several members raised concerns about the cost of the new building.",
          "The chair promised a full report before the end of the month."],
    "b": ["Thank you all for listening, and see you at the next meeting.",
          "Our guests tonight include two authors and a famous painter.",
          "Please remember to switch off the lights when you leave the room."],
}


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
@pytest.mark.parametrize("interrupt", [False, True])
async def test_files_written_as_events_come_are_those_of_the_whole_run(
        tmp_path: Path, whisper_backend: Backend, interrupt: bool) -> None:
    """The JSON lines, SRT and WebVTT written event by event are byte for
    byte what the run's events give at the end (what transcribe wrote
    before), for a whole run and for one stopped mid-speech (Ctrl-C: the
    end of the audio fed then clamps the last cues); no .part file is left."""
    cfg = load_config(env={})
    layout = CueLayout(max_line_chars=cfg.captions.max_line_chars,
                       max_lines=cfg.captions.max_lines, max_cue_s=cfg.captions.max_cue_s,
                       min_cue_s=cfg.captions.min_cue_s)
    srt_tags, vtt_tags = TagStyle(cfg.captions.srt_tags), TagStyle(cfg.captions.vtt_tags)
    jobs = [FileJob(name, speech_with_pauses(text, 0.9)[0]) for name, text in _TALKS.items()]
    files = [(job.stream, tmp_path / f"{job.stream}{suffix}",
              SubtitleWriter(vtt=suffix == ".vtt", layout=layout,
                             tags=vtt_tags if suffix == ".vtt" else srt_tags))
             for job in jobs for suffix in (".srt", ".vtt")]
    jsonl, subtitles = JsonlFile(tmp_path / "all.jsonl"), SubtitleFiles(files)
    events: list[EngineEvent] = []
    stop = asyncio.Event()

    def record(event: EngineEvent) -> None:
        events.append(event)
        finals = [e for e in events if isinstance(e, CaptionEvent) and e.final]
        if interrupt and len(finals) == 2:
            stop.set()

    async with Engine(cfg, whisper_backend) as engine:
        engine.add_listener(jsonl)
        engine.add_listener(subtitles)
        engine.add_listener(record)
        await transcribe_samples(cfg, engine, jobs, realtime=False, stop=stop)
    subtitles.close(complete=True)
    jsonl.close()
    assert jsonl.error is None and subtitles.error is None

    expected_jsonl = "".join(json.dumps(event_to_dict(e), ensure_ascii=False) + "\n"
                             for e in events)
    assert (tmp_path / "all.jsonl").read_text(encoding="utf-8") == expected_jsonl
    finals_made = 0
    for job in jobs:
        finals = sorted((e for e in events if isinstance(e, CaptionEvent)
                         and e.stream == job.stream and e.final), key=lambda e: e.segment)
        finals_made += len(finals)
        (until,) = [e.duration_s for e in events
                    if isinstance(e, StreamEnded) and e.stream == job.stream]
        srt = (tmp_path / f"{job.stream}.srt").read_bytes()
        vtt = (tmp_path / f"{job.stream}.vtt").read_bytes()
        assert srt == to_srt(finals, tags=srt_tags, layout=layout,
                             until=until).encode("utf-8")
        assert vtt == to_vtt(finals, tags=vtt_tags, layout=layout,
                             until=until).encode("utf-8")
        assert not (tmp_path / f"{job.stream}.srt.part").exists()
        assert part_path(tmp_path / f"{job.stream}.srt") == tmp_path / f"{job.stream}.srt.part"
    if interrupt:
        assert 2 <= finals_made < 6, "stopped mid-run"
    else:
        assert finals_made == 6
        assert all((tmp_path / f"{n}.srt").read_text().count(" --> ") >= 3 for n in _TALKS)


def test_a_part_file_left_as_a_link_is_replaced_not_written_through(tmp_path: Path) -> None:
    """A ``talk.srt.part`` left there as a symbolic link (to the user's
    notes): the subtitles went into the file it names, overwriting the
    notes, and the rename then made talk.srt that link. Now the link is
    removed and a file of its own written, by SubtitleFiles (transcribe)
    and write_file (subtitles, eval --json) alike."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    srt, report = tmp_path / "talk.srt", tmp_path / "r.json"
    for target in (srt, report):
        target.with_name(target.name + ".part").symlink_to(notes)
    subtitles = SubtitleFiles([("talk", srt, SubtitleWriter())])
    caption = CaptionEvent(stream="talk", segment=0, seq=1, final=True, text="hello",
                           plain_text="hello", stable="hello", unstable="", tags=(),
                           start=0.0, end=1.0, latency=0.1)
    subtitles(caption)
    subtitles(StreamEnded("talk", 1.5, 1, 1))
    assert subtitles.error is None
    write_file(report, b"{}\n")
    assert notes.read_text() == "my notes\n"
    assert not srt.is_symlink() and srt.read_text() == "1\n00:00:00,000 --> 00:00:01,000\nhello\n"
    assert not report.is_symlink() and report.read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "r.json", "talk.srt"]


def _final(stream: str, text: str, start: float) -> CaptionEvent:
    return CaptionEvent(stream=stream, segment=int(start), seq=int(start) + 1, final=True,
                        text=text, plain_text=text, stable=text, unstable="", tags=(),
                        start=start, end=start + 1.0, latency=0.1)


def test_a_part_file_removed_or_replaced_mid_run_is_never_renamed_onto_the_target(
        tmp_path: Path) -> None:
    """Another run writing the same subtitles (it removes the .part file it
    finds and makes its own), or someone removing the .part file: at the
    stream's end the file then at ``talk.srt.part``, the other run's half
    written one, was renamed onto talk.srt, which held a file no run had
    finished, and this run said nothing. Or the rename found nothing, one
    error line saying only "No such file or directory". Now the .part file
    is renamed only while it is still this run's own: else the error names
    it, and the target and the other's .part are left as they were."""
    srt, vtt = tmp_path / "talk.srt", tmp_path / "talk.vtt"
    srt.write_text("the old subtitles\n")
    subtitles = SubtitleFiles([("talk", srt, SubtitleWriter()),
                               ("talk", vtt, SubtitleWriter(vtt=True))])
    subtitles(_final("talk", "hello", 0.0))
    subtitles(_final("talk", "there", 2.0))
    # Another run takes talk.srt.part; talk.vtt.part is deleted.
    (tmp_path / "talk.srt.part").unlink()
    (tmp_path / "talk.srt.part").write_text("1\n00:00:00,000 --> 00:00:01,000\nother\n")
    (tmp_path / "talk.vtt.part").unlink()
    subtitles(StreamEnded("talk", 3.5, 2, 2))
    assert subtitles.error is not None
    target, error = subtitles.error
    assert target == srt
    assert f"{tmp_path / 'talk.srt.part'} was removed or replaced" in str(error.strerror)
    assert srt.read_text() == "the old subtitles\n"
    assert (tmp_path / "talk.srt.part").read_text().endswith("other\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["talk.srt", "talk.srt.part"]
    subtitles.close(complete=True)   # the end of the run: nothing more happens
    assert srt.read_text() == "the old subtitles\n"


def test_a_jsonl_file_removed_mid_run_is_a_failed_write(tmp_path: Path) -> None:
    """The --jsonl file deleted while written (by hand, or with its folder):
    every event after that went to a file no one can open, and transcribe
    exited 0 as if all were there. Closing it is now the failure to report,
    saying so; a file only renamed meanwhile holds every event, no error."""
    gone, moved = tmp_path / "gone.jsonl", tmp_path / "moved.jsonl"
    files = [JsonlFile(gone), JsonlFile(moved)]
    for jsonl in files:
        jsonl(_final("talk", "hello", 0.0))
    gone.unlink()
    moved.rename(tmp_path / "elsewhere.jsonl")
    for jsonl in files:
        jsonl(_final("talk", "there", 2.0))
        jsonl.close()
    assert files[0].error is not None
    assert files[0].error.strerror == "it was removed while it was written"
    assert files[0].error.filename == str(gone)
    assert files[1].error is None
    assert (tmp_path / "elsewhere.jsonl").read_text().count("\n") == 2


@pytest.mark.parametrize("where", ["cue", "end", "rename"])
def test_subtitles_that_fail_to_be_written_leave_no_part_and_the_old_file_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A full disk partway through a stream's subtitles (a cue, the end
    written when the stream ends) or a rename that fails: the failure is
    kept for the one error line and the target left as it was, but the
    ``.part`` file, cut short, was left beside it (on a disk that is full).
    Now it is removed, as ``subtitles`` and ``eval --json`` remove theirs;
    a file that did not fail is still written."""
    import errno
    import os

    from tests.helpers.disk import disk_full_after

    srt, vtt = tmp_path / "talk.srt", tmp_path / "talk.vtt"
    srt.write_text("the old subtitles\n")
    layout = CueLayout(max_cue_s=1.0)
    subtitles = SubtitleFiles([("talk", srt, SubtitleWriter(layout=layout)),
                               ("talk", vtt, SubtitleWriter(vtt=True, layout=layout))])
    words = "a sentence long enough to make its file grow past the limit"
    if where == "cue":
        with disk_full_after(40):
            for n in range(4):
                subtitles(_final("talk", f"{words} {n}", float(n)))
        subtitles(StreamEnded("talk", 5.0, 4, 4))
    elif where == "end":
        subtitles(_final("talk", words, 0.0))
        with disk_full_after(10):
            subtitles(StreamEnded("talk", 5.0, 1, 1))
    else:
        real = os.replace

        def replace(src: Path, dst: Path) -> None:
            if dst == srt:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            real(src, dst)
        monkeypatch.setattr(os, "replace", replace)
        subtitles(_final("talk", words, 0.0))
        subtitles(StreamEnded("talk", 5.0, 1, 1))
    subtitles.close(complete=True)
    assert subtitles.error is not None and subtitles.error[0] == srt
    assert srt.read_text() == "the old subtitles\n"
    left = sorted(p.name for p in tmp_path.iterdir())
    if where == "rename":
        assert vtt.read_text().startswith("WEBVTT")
        assert left == ["talk.srt", "talk.vtt"], left
    else:   # the VTT fails as the SRT does under the limit
        assert left == ["talk.srt"], left
