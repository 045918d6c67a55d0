"""The journal: every final caption, durably, one JSONL file set per stream,
and how far each stream's ``seq`` may have gone.

Three modules, by job:

- :mod:`.records`: what a journal line is (a final, a seq reservation, an
  end record, a loss record) and its codec (pure).
- :mod:`.files`: the files' names (``{stream}.{index}.{start}.jsonl``) and
  the rules on them: rotation by size and by age, retention (pure).
- :mod:`.store`: :class:`Journal`, which writes and reads the files (the
  I/O): its module doc holds the ordering, durability, crash-safety,
  retention and resume contracts.

Every public name of the three is importable from here.
"""

from __future__ import annotations

from .files import (
    CLOCK_SLACK_S,
    JournalFile,
    expired,
    file_age,
    file_name,
    parse_file_name,
    recorded_start,
    should_rotate,
)
from .records import (
    EndRecord,
    JournalRecord,
    LostRecord,
    SeqReservation,
    decode_end,
    decode_line,
    decode_lost,
    decode_record,
    decode_reservation,
    encode_end,
    encode_lost,
    encode_record,
    encode_reservation,
)
from .store import (
    EPOCH_FILE,
    LOCK_FILE,
    LOST_LISTED,
    LOST_STREAMS,
    PRUNED_FILE,
    PRUNED_REMEMBERED,
    SEQ_RESERVE_BLOCK,
    SYNC_CLOSE_WAIT_S,
    Journal,
    Replay,
)

__all__ = [
    "CLOCK_SLACK_S",
    "EPOCH_FILE",
    "LOCK_FILE",
    "LOST_LISTED",
    "LOST_STREAMS",
    "PRUNED_FILE",
    "PRUNED_REMEMBERED",
    "SEQ_RESERVE_BLOCK",
    "SYNC_CLOSE_WAIT_S",
    "EndRecord",
    "Journal",
    "JournalFile",
    "JournalRecord",
    "LostRecord",
    "Replay",
    "SeqReservation",
    "decode_end",
    "decode_line",
    "decode_lost",
    "decode_record",
    "decode_reservation",
    "encode_end",
    "encode_lost",
    "encode_record",
    "encode_reservation",
    "expired",
    "file_age",
    "file_name",
    "parse_file_name",
    "recorded_start",
    "should_rotate",
]
