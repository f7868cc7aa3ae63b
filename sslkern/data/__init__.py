"""Streaming data: sources on disk or in memory, a stateless batch order, decode-only loading.

``open_dataset(path)`` opens an ImageFolder tree, indexed tar shards, CIFAR-10 batches or the
bundled digits (``path=None``); :class:`BatchOrder` is the global batch order as a pure
function of (seed, epoch, step); :class:`TrainLoader` decodes this rank's images of each
step in worker processes into ragged uint8 batches. The views are rendered on the training
device by :func:`sslkern.render_views` from parameters drawn by :mod:`sslkern.views`.
``python -m sslkern.data.shard`` writes and indexes tar shards.
"""
from .datasets import IMAGENET_MEAN, IMAGENET_STD, Dataset, digits, open_dataset  # noqa: F401
from .decode import DecodeError, decode_image  # noqa: F401
from .loader import DecodedBatch, TrainLoader, pack  # noqa: F401
from .sampler import BatchOrder  # noqa: F401
from .sources import (ArraySource, DataError, ImageFolderSource, Source, SubsetSource,  # noqa: F401
                      TarShardSource)
