"""Shared recipe plumbing: the training loop, views, data, evaluation, checkpoints, logging.

Written once and used by every recipe under ``recipes/``; not imported by ``import sslkern``.
A recipe subclasses :class:`Method` and calls :func:`run` (see :mod:`sslkern.train.loop`).
"""
from .context import StepContext  # noqa: F401
from .loop import Method, build_vit, parse_args, run, sincos_pos_embed, use_sincos_pos_embed  # noqa: F401
