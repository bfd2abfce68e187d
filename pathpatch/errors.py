"""User-facing errors: every one names the bad value, what is allowed, and the likely fix."""


class PathPatchError(ValueError):
    """A mistake in user input (model name, pattern, dataset, spec); the message says what to do."""
