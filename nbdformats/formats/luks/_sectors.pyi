# The C extension _sectors.c (see its comment).

def crypt(mode: int, key: bytes, data: memoryview | bytearray, first_iv: int, iv_step: int, sector_size: int,
          encrypt: bool, iv_mode: int, essiv_key: bytes, /) -> None: ...
