"""Tests of the audio layer: resampling, sources and the segmenter."""

__all__: list[str] = []
