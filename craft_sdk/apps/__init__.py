"""Applications built on the public API: ``demo`` (what ``craft-sdk demo`` runs: tune, evaluate, export, deploy).

The CLI (:mod:`craft_sdk.cli`), the server (:mod:`craft_sdk.serve`) and the sweep runner (:mod:`craft_sdk.sweep`)
are applications too; they keep their own folders.
"""
