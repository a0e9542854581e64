"""excise: locate where a language model keeps a piece of knowledge, remove it, and verify that it stays gone."""

__version__ = "0.1.0"
