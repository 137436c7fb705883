"""TLS for the server and our client: X.509 or pre-shared keys (psk.py) over memory BIOs (memorybio.py)."""
