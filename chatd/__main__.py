"""``python -m chatd`` runs the chatd command line."""

from chatd.cli import main

main()
