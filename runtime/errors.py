"""Errors the runtime raises for users: each message names the file, field or tensor at fault."""


class ModelLoadError(ValueError):
    """A model directory cannot be served: missing file, unsupported config value, or bad weights."""


class WeightError(ModelLoadError):
    """A checkpoint tensor is missing, unexpected, or of the wrong shape."""
