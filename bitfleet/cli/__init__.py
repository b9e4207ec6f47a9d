"""The `bitfleet` command line."""
