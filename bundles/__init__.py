"""The bundled models: bundles/default is what `python -m server` serves without --model (shipped as package
data, so a wheel install serves too)."""
