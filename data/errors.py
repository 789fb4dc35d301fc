class DataError(ValueError):
    """Input data that cannot be used; the message names the source, the file or the field."""
