"""Diskless checkpointing (seed 003: Enhanced N+1 Parity with partial message logging).

Sans-IO core (no sockets, no trio, time passed in):

- ``parity``   N+1 XOR parity at block granularity: deltas, reconstruction, snapshots.
- ``erasure``  optional Reed-Solomon code with m parity holders (survives any m failures).
- ``msglog``   the seed's sent and receipt tables (partial message logging).
- ``grant``    the seed's Timeout rule at the coordinator, plus Plank's blocking round.
- ``overhead`` Vaidya's model (seed equations 1-3): T_opt, Gamma, r.

The daemon (coordinator / backup roles), the application library and the example
applications are built on top of these; see docs/checkpoint.md and
docs/checkpoint-core.md.
"""
