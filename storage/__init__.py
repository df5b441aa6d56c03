"""The platform registry, and the ground every other layer stands on: errors, files, paths,
the database, and offline mode (`offline.go_offline`, which every entry point calls first)."""
