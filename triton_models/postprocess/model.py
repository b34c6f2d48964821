"""Triton Python-backend adapter; the model is voltacache.serving.python_models.PostprocessModel."""

from voltacache.serving.python_models import PostprocessModel as TritonPythonModel  # noqa: F401
