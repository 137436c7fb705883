"""LUKS1 and LUKS2: headers (structs, header), key derivation and the anti-forensic merge (kdf),
unlocking a keyslot (unlock), and the sector ciphers of the payload (cipher)."""
