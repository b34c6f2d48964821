"""Procedural captioned shapes: the data the embedded tiny model is trained on, and a checker of its output.

`dataset` draws "a {color} {shape} on a {background} background" images; `checker` reads color, shape and
background back out of an image by plain image analysis, so prompt adherence is measured without a learned
model (docs/platform.md).
"""
