"""Exceptions free_jax raises for bad input. All are `ValueError`s, so callers can catch broadly."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names it and what would be valid."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match its configuration."""


class InputError(ValueError):
    """An argument to a free_jax function is invalid; the message names it and what is valid."""


class DataError(ValueError):
    """A data file or dataset is missing, unreadable, lacks a field, or cannot be downloaded."""
