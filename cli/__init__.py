"""kvrelay command line."""
