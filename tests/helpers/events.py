"""Engine listeners that record events for assertions."""

from __future__ import annotations

from evoxtral_stream.events import EngineEvent, StreamEnded


class EndedStreams(list[StreamEnded]):
    """An engine listener (``engine.add_listener``) keeping every ``StreamEnded``;
    one instance may listen to several engines in turn (a server restart)."""

    def __call__(self, event: EngineEvent) -> None:
        if isinstance(event, StreamEnded):
            self.append(event)
