"""Errors users see. Each names the file, field or input at fault instead of surfacing a deep torch traceback."""


class UniFlowError(ValueError):
    """Base class for every error this project raises on bad input."""


class ConfigError(UniFlowError):
    """A config file or dict has an unknown field, a missing field or a value of the wrong kind."""


class CheckpointError(UniFlowError):
    """A checkpoint folder is missing files, is truncated, or does not match the model."""


class ImageInputError(UniFlowError):
    """An image cannot be used: unreadable file, wrong shape or dtype, size not divisible by the patch size."""
