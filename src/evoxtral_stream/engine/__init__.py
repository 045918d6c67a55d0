"""Stream sessions, the model worker thread and the model backends."""
