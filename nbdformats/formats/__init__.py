"""Every on-disk format nbdformats reads or writes, pure: tar, zip, gzip (and random access
into deflate streams), xz, zstd, lzip, LUKS, XVA, VMDK, VHD, VHDX, VDI, OVF, MBR and GPT
partition tables, FAT.

Rules that keep the package shareable between filters, plugins and tests:

- nothing here imports from nbdformats.server, .api, .plugins or .filters
  (tests/test_formats_pure.py checks it);
- readers take a `read(offset, length) -> bytes` callable (`readers.Reader`), so the same
  code runs over a layer, a file or bytes in a test;
- struct layouts are module-level `struct.Struct` definitions (or a `structs` module of a
  format package), quoted from the format's specification, apart from the logic;
- errors are `errors.FormatError` subclasses, one per format; a filter or plugin turns them
  into NBDError (a request fails) or ConfigError (start-up stops).
"""
