"""Export a trained model to one file that runs, and really skips blocks, without aig-jax.

``python -m aig_jax.export`` writes the artefact (:mod:`aig_jax.export.artefact`, with the
programs of :mod:`aig_jax.export.programs`); :mod:`aig_jax.export.runtime` loads and runs it
with jax and numpy alone (a standalone file); ``python -m aig_jax.export.predict`` classifies
image files with it.
"""

from aig_jax.errors import UserError


class ExportError(UserError, ValueError):
    """An export or prediction cannot proceed: a bad flag, image or artefact."""
