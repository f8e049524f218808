"""User-facing errors.

Every error the engine raises on bad input is a :class:`MedSAMError` whose message names the
problem and says what to do about it; front ends (command line, Slicer) show the message as is.
"""


class MedSAMError(ValueError):
    """Bad input or an unusable resource, with a message meant for the user."""
