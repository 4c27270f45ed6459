"""Attacks the project runs against itself, per privacy mode, from a finished run's folder."""
