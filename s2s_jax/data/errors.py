"""The data layer's user-facing error type."""

from __future__ import annotations

from s2s_jax.config import UserError


class DataError(UserError):
    """Bad input data (missing/misaligned/undecodable file, impossible vocabulary size...).

    Raised while preparing, before any training starts; the message is one sentence naming the
    file (and line where it applies) and the fix, which the CLI prints without a traceback.
    """
