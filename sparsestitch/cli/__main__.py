"""``python -m sparsestitch.cli``."""

from .app import main

main()
