"""Every error Fermion raises on purpose. Each names the file, line or field it is about and says what would be
right; the command line prints it as one line and exits 2."""


class ExportError(Exception):
    """A checkpoint or option that cannot be exported faithfully; the message names the field and what would work."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and the problem."""


class StorageError(Exception):
    """The file system refused a write (no space left, read-only, permission denied); the message names the path
    (also `path`), why, and for a full disk the space needed and free. What was there before is left as it was."""

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = path


class DamagedFileError(Exception):
    """A run's file damaged in a way no interrupted write leaves (a bad line before the last); the message names
    file:line and what to do."""
