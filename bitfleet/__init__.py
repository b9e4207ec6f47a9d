"""bitfleet: federated learning with hybrid PTQ/QAT for fleets of edge boards.

This package holds what the board and the server share: quantizers, models, data sets,
the wire protocol and the `bitfleet` command line. The roles (`edge_agent`, `coordinator`,
`export`) import from here, never the other way round.
"""

__version__ = "0.1.0"
