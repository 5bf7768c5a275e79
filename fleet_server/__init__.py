"""The fleet server: admin API, store, rollout engine, MQTT bridge, artifact serving.

Entry points: ``fleet_server.app.create_app(settings)`` and
``fleet_server.runner.ServerThread(settings)``; settings in ``fleet_server.settings``.
"""
