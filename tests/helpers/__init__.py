"""Helpers shared by the test suites (signal generators, event checkers)."""

__all__: list[str] = []
