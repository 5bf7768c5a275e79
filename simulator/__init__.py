"""Many real device agents in one process (one asyncio loop), for tests, demos and scale trials."""
