"""Triton Python-backend adapter; the model is voltacache.serving.python_models.ComponentModel."""

from voltacache.serving.python_models import ComponentModel as TritonPythonModel  # noqa: F401
