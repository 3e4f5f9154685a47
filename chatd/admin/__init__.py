"""The admin HTTP API (quart-trio under hypercorn)."""
