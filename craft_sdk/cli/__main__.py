"""``python -m craft_sdk.cli``."""

from . import main

main()
