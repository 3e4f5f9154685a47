"""Accounts, passwords, MFA, sessions and rate limits."""
