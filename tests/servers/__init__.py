"""Real loopback HTTP servers that stand in for external services in tests."""
