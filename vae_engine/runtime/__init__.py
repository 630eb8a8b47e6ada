"""Running exported models: backends (one per runtime), the path registry, `--precision auto` (tuning), the
Engine, and the side-by-side benchmark of paths."""
