"""The fleet-level tools: what runs every role at once, on one machine.

`simulate` (many virtual boards in one process, through the coordinator's and the agents' own
code), `demo` (broker, coordinator and agent processes, an ONNX model per board), `bench_fleet`
(the real coordinator against N lightweight agents over Mosquitto), `provision` (a fleet's CA,
accounts, ACL and Mosquitto config, offered as `bitfleet coordinator provision`) and `broker`
(the embedded amqtt broker and the Mosquitto process these tools, and the tests, start).

Import rule: this package sits above the roles. It may import `bitfleet`, `coordinator`,
`edge_agent` and `export`; none of them may import `fleet`. Its commands reach the CLI through
entry points (`bitfleet.commands`, `bitfleet.benches`, `bitfleet.coordinator_actions`).
"""
