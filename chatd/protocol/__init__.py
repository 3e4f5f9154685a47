"""The client protocol: frames and the sans-I/O connection core.

This package must import neither trio nor any database module (a test
checks): it is pure bytes-to-actions logic.
"""
