"""Triton Python-backend adapters. `voltacache deploy` copies each model.py into the model repository.

Each adapter is one line: the logic lives in voltacache.serving.python_models, where it is tested
without a server. Generated repositories (the demo's) land in triton_models/generated/ (git-ignored).
"""
