"""Errors the runtime raises for users: each message names the file, field or tensor at fault."""


class ModelLoadError(ValueError):
    """A model directory cannot be served: missing file, unsupported config value, or bad weights."""


class WeightError(ModelLoadError):
    """A checkpoint tensor is missing, unexpected, or of the wrong shape."""


class InputError(ValueError):
    """A request's image that a model cannot take (e.g. an aspect ratio beyond the VLM's limit). It fails that image
    alone and never counts toward a stage's circuit breaker, which counts model and system failures."""
