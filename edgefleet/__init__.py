"""edgefleet's command line, the end-to-end demo, and the broker launcher used by demo and tests.

This package sits above the five product packages and may import all of them;
none of them imports it (see docs/decisions/0001-package-layout.md).
"""

__version__ = "0.1.0"
