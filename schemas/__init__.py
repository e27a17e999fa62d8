"""Pydantic models of every document nestprune persists, with their exported JSON Schema files.

Each module here defines ``DOCUMENTS = {"<file stem>": Model}``; ``python -m schemas.export`` writes
``schemas/<file stem>.schema.json`` for each. Nothing here imports torch or nestprune.
"""

SCHEMA_MODULES = ("schemas.artifact", "schemas.variant", "schemas.registry")
