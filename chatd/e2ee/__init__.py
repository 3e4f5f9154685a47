"""Server side of end-to-end encryption: devices, identity keys, one-time keys.

The server never holds a private key. It stores public keys, checks their
Ed25519 signatures (PyNaCl), and hands each one-time key out exactly once.
"""
