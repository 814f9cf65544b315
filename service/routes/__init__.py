"""HTTP routes, one module per resource: classification, tasks, health."""
