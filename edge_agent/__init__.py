"""edge_agent: what runs on the board. Filled in by the fleet issue."""
