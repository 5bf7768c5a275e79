# tests/ is on sys.path (rootdir-relative packages), so the agent harness and fixtures are shared.
from agent.conftest import artifacts, observer

__all__ = ["artifacts", "observer"]
