"""The durable Batch API: JSONL jobs run on the fleet's spare capacity (docs/batch.md).

* ``parse``  - the common batch format, one error per bad line (pure).
* ``store``  - jobs, items and results in SQLite under the controller's data dir.
* ``runner`` - the controller's reconcile loop that sends items to the routers.
* ``service`` - the ``kvfleet.v1.Batch`` gRPC edge.
"""
