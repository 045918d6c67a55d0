"""Tagged text: tag vocabulary, merger, caption formats and metrics."""
