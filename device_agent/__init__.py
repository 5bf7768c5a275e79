"""The edgefleet device agent: verifies, installs, hot-swaps and serves models; reports upstream.

Installs with the ``agent`` extra only (no server or compiler dependencies).
"""

__version__ = "0.1.0"
