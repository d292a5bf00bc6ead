"""The error a dataset raises: ``DataError``, a dataset that cannot be found or used.

Every reader in ``bnas.data`` raises it with a message that says where bnas looked and how to
get the data; it is a ``BnasError``, so the command line reports it without a traceback.
"""

from __future__ import annotations

from ..errors import BnasError


class DataError(BnasError):
    """A dataset that cannot be found or used; the message says where bnas looked."""
