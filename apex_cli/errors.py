"""Every error a user can fix is an ApexError. Anything else reaching the CLI is a bug."""


class ApexError(Exception):
    """Base class for user-fixable errors; ``hint`` says what to do next."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class RecipeError(ApexError):
    """The recipe YAML or a ``--set key=value`` override is invalid."""


class CheckpointError(ApexError):
    """A checkpoint is missing, unreadable or belongs to another model."""


class DataError(ApexError):
    """Input data (prompts, images, folders) is missing or malformed."""
