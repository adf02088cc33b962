"""The tools around the three services; run each from the repository's top folder: ``python -m tools.<name> --help``."""
