"""The project's exception types: everything a user can cause raises one of these."""


class KilnError(Exception):
    """Base class for errors caused by user input (files, arguments, model sizes)."""


class CheckpointError(KilnError):
    """A model file or folder is missing, malformed or inconsistent."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint is well formed but its architecture or a feature of it is not supported."""


class PickleRefusedError(CheckpointError):
    """A checkpoint only has pickle weights and loading pickles was not allowed."""


class TokenizerError(KilnError):
    """The tokenizer files are missing or malformed."""


class ChatTemplateError(KilnError):
    """A chat template failed to render (including its own raise_exception calls)."""


class ContextLengthError(KilnError):
    """A prompt plus the requested tokens does not fit the context the engine was loaded with."""
