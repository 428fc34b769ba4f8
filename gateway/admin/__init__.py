"""The admin API (its own listener) and the same operations from the command line."""
