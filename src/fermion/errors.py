"""Every error Fermion raises on purpose. Each names the file, line or field it is about and says what would be
right; the command line prints it as one line and exits 2."""


class ExportError(Exception):
    """A checkpoint or option that cannot be exported faithfully; the message names the field and what would work."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and the problem."""
