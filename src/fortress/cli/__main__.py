"""``python -m fortress.cli`` runs the CLI."""

from fortress.cli import main

main()
