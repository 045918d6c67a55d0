"""evoxtral-stream: live captions with expressive tags from Voxtral + the Evoxtral LoRA."""

__all__ = ["__version__"]

__version__ = "0.1.0"
