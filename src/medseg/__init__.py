"""medseg."""
