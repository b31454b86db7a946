"""damselfly: peer-to-peer distribution of files, images and model weights.

Speaks Dragonfly v2's gRPC API and Vortex frames; everything is a plugin.
"""

from __future__ import annotations

from loguru import logger

__version__ = "0.1.0"

logger.disable("damselfly")

from damselfly.hookspecs import hookimpl  # noqa: E402
from damselfly.sdk.client import Client, DownloadResult, Progress, SyncClient  # noqa: E402

__all__ = ["Client", "DownloadResult", "Progress", "SyncClient", "__version__", "hookimpl"]
