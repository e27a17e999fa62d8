"""``python -m nestprune`` runs the command line (also under ``torchrun ... -m nestprune``)."""

from nestprune.cli.main import main

main()
