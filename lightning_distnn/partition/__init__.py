"""Partitioners: data (samples over data-parallel ranks, features over feature-parallel ranks) and
model (layers over pipeline stages)."""
