"""The one exception users see: a problem with their input, phrased as what to do about it."""


class SidError(Exception):
    """Bad input (config, path, checkpoint, teacher) or an aborted run, with a message that says what to do.

    Entry points print only ``str(error)`` (one line), never a traceback.
    """
