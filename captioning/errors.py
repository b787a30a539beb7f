"""Every error a person can act on, in one module at the bottom of the package: the commands
print their message as one line (`command`), any other exception is a bug and keeps its
traceback. Each names the file, field or folder at fault."""

from model import WeightsError  # model.py stands alone, so its one error lives there


class ConfigError(ValueError):
    """A configuration value that is not allowed; the message names the field and the choices."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the mismatch."""


class AnnotationError(ValueError):
    """An annotations file that cannot be read; the message names the file (and row)."""


class ImageLoadError(OSError):
    """An image that is missing or cannot be decoded; the message names the file."""


class DownloadError(RuntimeError):
    """A file could not be downloaded, verified or unpacked."""


class CacheSpaceError(OSError):
    """Too little free disk space for a cache; the message names the folder and both sizes."""


class DistributedError(RuntimeError):
    """A failure every rank raises together, with the same message."""


# What a person can act on: bad input or a broken environment, not a bug.
USER_ERRORS = (
    ValueError,  # a value not allowed: ConfigError, AnnotationError, malformed files
    OSError,  # missing or unreadable files (ImageLoadError, CacheSpaceError), no network, full disk
    CheckpointError,
    DownloadError,
    DistributedError,
    WeightsError,  # no network for the ImageNet weights, or an unusable weights file
)
