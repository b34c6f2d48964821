"""Triton Python-backend adapter; the model is voltacache.serving.python_models.DenoiserModel."""

from voltacache.serving.python_models import DenoiserModel as TritonPythonModel  # noqa: F401
