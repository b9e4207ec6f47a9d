"""coordinator: what runs on the server. Filled in by the fleet issue."""
