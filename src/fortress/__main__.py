"""``python -m fortress`` runs the CLI."""

from fortress.cli import main

main()
