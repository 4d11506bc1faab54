"""``python -m craft_sdk``."""

from .cli import main

main()
