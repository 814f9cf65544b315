"""RepServe's HTTP service: one shared backbone, per-request task switching, dynamic batching, metrics.

Layers (each its own module): ``settings`` (configuration), ``registry`` (tasks loaded from the store),
``batcher`` (per-task queues and the scheduler), ``policy`` (the auto policy's cost model), ``engine`` (the
single worker that owns the model), ``lifecycle`` (building and starting them), ``app`` + ``routes`` (HTTP).
"""

__version__ = "0.1.0"
