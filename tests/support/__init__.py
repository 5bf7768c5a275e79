"""Harness pieces every test package shares: one way to wait for a condition
(``waiting.wait_for``) and one real HTTP server on loopback (``loopback_http``).

Imported as ``tests.support.<module>`` (the project root is on ``sys.path`` as it is for
``tests.mqtt_clients``), so a test in any package, on any xdist worker, uses the same pieces.
"""
