"""Tagged text: tag vocabulary, merger, caption formats and metrics."""

__all__: list[str] = []
