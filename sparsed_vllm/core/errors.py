"""The error every request check raises, naming the field the way the request spells it."""

from __future__ import annotations


class ParameterError(ValueError):
    """A bad request value. `name` is the field (`steps`, `sparsed_block_size`, `seed`, ...) so
    the front end can report it (vLLM's `VLLMValidationError(parameter=...)`, HTTP 400)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
