# The C extension _scandir.c (see its comment).

def list_and_stat(path: str, /) -> tuple[list[str], list[int], list[int], list[int], list[float], list[float],
                                         list[float], list[int]]: ...
