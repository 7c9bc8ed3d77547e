"""The bundled default model: ``<version>/model.pt + manifest.json``, produced by this project's own
pipeline (no download). Regenerate with::

    authopt train --world default --out model/artifacts

(the `.work/` directory it leaves is git-ignored). `authopt serve` uses this directory when no model
directory is configured.
"""

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent

__all__ = ["DEFAULT_MODEL_DIR"]
