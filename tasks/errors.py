"""The data errors every reader, generator and download raises; light to import (no torch), so
that ``prepare_data.py`` fails fast."""


class DataNotFoundError(FileNotFoundError):
    """Raised when a task's files are missing; the message says which command provides them."""


class DataFormatError(ValueError):
    """Raised on a malformed data file; the message names the file, the line or field, and the fix."""
