"""Service level objectives per model: SLOs as data, error budgets, burn-rate alerts.

The pure core (``spec``, ``series``, ``burn``, ``alerts``) takes numbers and times
in and gives statuses and alert transitions out, so it runs the same under a
fast-forward clock in tests as in the server's ticker, which feeds it the
telemetry totals it samples and stores what it decides (``fleet_server.slo_store``).
"""
