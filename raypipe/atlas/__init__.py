"""atlas stage."""
