"""Every error a user can fix is an ApexError. Anything else reaching the CLI is a bug."""


class ApexError(Exception):
    """Base class for user-fixable errors; ``hint`` says what to do next."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class RecipeError(ApexError):
    """The recipe YAML or a ``--set key=value`` override is invalid."""


class CheckpointError(ApexError):
    """A checkpoint is missing, unreadable or belongs to another model."""


class DataError(ApexError):
    """Input data (prompts, images, folders) is missing or malformed."""


class TrainingError(ApexError):
    """A run stopped because training went wrong (e.g. non-finite losses step after step)."""


class RunInterruptedError(ApexError):
    """SIGINT or SIGTERM stopped a run after it saved a checkpoint; the CLI exits with 130."""

    exit_code = 130
