"""The errors a user can cause while scoring, home of aaclip's user-error classes.

Every such error is an ``AaclipError`` whose message is one paragraph naming the file, field or flag
and what to do; a command line (``aaclip``, ``aaclip-score``) prints it and exits 2 without a
traceback. `aaclip_core.errors` re-exports these very classes and adds the training stack's own, so
an error raised here is the one aaclip's CLI handles.
"""


class AaclipError(Exception):
    """Base class for errors caused by user input or the user's environment."""


class ConfigError(AaclipError):
    """A recipe, override, flag or model description is invalid."""


class DataError(AaclipError):
    """A dataset, image, mask or metadata file is missing or inconsistent."""


class CheckpointError(AaclipError):
    """A checkpoint or exported model cannot be read, is unsafe, or does not fit."""


class LocalFileError(AaclipError):
    """A local file or folder cannot be written or read (a full disk, a permission, a path through a
    regular file): the message names the path and the operating system's cause."""


class UnknownClass(DataError):
    """An image was given a class the detector was not exported for; ``known`` lists the ones it has."""

    def __init__(self, message: str, class_name: str, known: list[str]) -> None:
        super().__init__(message)
        self.class_name = class_name
        self.known = list(known)
