"""Triton Python-backend adapter; the model is voltacache.serving.python_models.CacheSearchModel."""

from voltacache.serving.python_models import CacheSearchModel as TritonPythonModel  # noqa: F401
