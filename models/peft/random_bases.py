"""placeholder while helpers write it."""
