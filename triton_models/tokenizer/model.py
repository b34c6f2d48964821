"""Triton Python-backend adapter; the model is voltacache.serving.python_models.TokenizerModel."""

from voltacache.serving.python_models import TokenizerModel as TritonPythonModel  # noqa: F401
