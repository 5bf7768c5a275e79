"""One module per command group of the `edgefleet` CLI."""
