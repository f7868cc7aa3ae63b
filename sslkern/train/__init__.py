"""Shared recipe plumbing: data, evaluation, checkpoints, run logging, torchrun helpers.

Written once and used by every recipe under ``recipes/``; not imported by ``import sslkern``.
"""
