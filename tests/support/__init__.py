"""Harness pieces every test package shares: one way to wait for a condition
(``waiting.wait_for``), one real HTTP server on loopback (``loopback_http``) and the
descriptor count behind the per-module leak check (``descriptors``).

Imported as ``tests.support.<module>`` (the project root is on ``sys.path`` as it is for
``tests.mqtt_clients``), so a test in any package, on any xdist worker, uses the same pieces.
"""
