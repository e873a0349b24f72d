"""The stage kit (the bottom floor): what every stage is built from, knowing no stage.

``stage`` (the shard-stage contract), ``plan`` (shards, steps, plans, fingerprints,
object-ref resolution), ``outputs`` (atomic parts, markers), ``execute`` (Ray plumbing),
``expression`` (the one ``log_normalize``).
"""
