"""The error every corpus reader raises: ``CorpusError`` names the file and the field (fm.data.schema re-uses it).

It lives below both the vocabulary (fm.data.vocab) and the corpus format (fm.data.schema), which reads a vocabulary
to check a manifest, so neither imports the other for it.
"""

from __future__ import annotations


class CorpusError(ValueError):
    """A corpus folder, manifest or shard is missing, malformed or inconsistent."""
