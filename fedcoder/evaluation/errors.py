"""The one exception the evaluation harness raises for bad input."""


class EvalError(ValueError):
    """Input the harness cannot use; the message is one line, fit for a terminal."""
