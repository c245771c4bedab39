"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """A problem with the user's input (recipe, file, model, flag). The message names the culprit."""


class TrainingDiverged(UserError):
    """Training stopped: too many steps in a row had a non-finite loss or gradient (see
    `schedule.max_consecutive_skips`)."""
