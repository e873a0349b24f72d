"""genes stage."""
