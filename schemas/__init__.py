"""Pydantic models of every document nestprune persists, with their exported JSON Schema files.

Each module here defines ``DOCUMENTS = {"<file stem>": Model}``; ``python -m nestprune.schemas.export`` writes
``schemas/<file stem>.schema.json`` for each. Nothing here imports torch or nestprune.
"""

SCHEMA_MODULES = ("nestprune.schemas.artifact", "nestprune.schemas.variant", "nestprune.schemas.registry",
                  "nestprune.schemas.resume")
