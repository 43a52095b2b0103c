"""Errors a user can fix. The CLI prints their one-line message (file:line or config key, and what to do) and
exits with status 2, without a traceback."""


class FinLLMError(Exception):
    """Base class: the message is complete and meant for the user."""


class DataError(FinLLMError, ValueError):
    """Bad input data: 'file:line: what is wrong; what to do'."""


class ModelError(FinLLMError, ValueError):
    """A model, tokenizer, adapter or checkpoint that cannot be used."""


class ConfigError(FinLLMError, ValueError):
    """A config value that cannot work: names the key."""
