"""image filter: find the disk image format of the layer below by its magic and decode it.

`--filter=image --filter=xz file disk.qcow2.xz` serves the disk inside the qcow2; an export
whose bytes match no format is served as it is (raw, writable if the layer below is).  Each
export is probed when it is opened, so an archive's members may be of different formats.

The image filter takes the parameters of every decoder (backing=, snapshot=, passphrase= ...)
and hands each decoder its own.  A decoder is a filter with two start-up steps: `prepare()`
(what it needs before any export is opened) and `check_default_export()` (its start-up check,
run only when the default export is in its format).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..api.chain import Filter, FilterHandle, Layer, OpenNext
from ..api.params import params_of
from ..formats.readers import Reader
from ..registry import load_filter
from ._decompress import layer_reader

Match = Callable[[Reader, int], bool]  # (read, size of the layer below) -> is it this format?


def starts_with(magic: bytes, offset: int = 0) -> Match:
    return lambda read, size: size >= offset + len(magic) and read(offset, len(magic)) == magic


def ends_with(magic: bytes, from_end: int) -> Match:
    """`magic` `from_end` bytes before the end (a fixed VHD's footer)."""
    return lambda read, size: size >= from_end and read(size - from_end, len(magic)) == magic


def either(*matches: Match) -> Match:
    return lambda read, size: any(match(read, size) for match in matches)


@dataclass(frozen=True)
class Decoder:
    filter: str  # the decoding filter's name
    matches: Match


# One line per format, tried in order; the first that matches decodes the export.
DECODERS = [
    Decoder("qcow2", starts_with(b"QFI\xfb")),
    Decoder("vmdk", either(starts_with(b"KDMV"), starts_with(b"# Disk DescriptorFile"))),
    Decoder("vhdx", starts_with(b"vhdxfile")),
    Decoder("vdi", starts_with(b"\x7f\x10\xda\xbe", 64)),  # VDIPREHEADER's u32Signature 0xBEDA107F
    Decoder("vpc", either(starts_with(b"conectix"), ends_with(b"conectix", 512))),  # a dynamic disk's copy, the footer
]


class ImageFilter(Filter):
    """Probe the disk image format below (qcow2, VMDK, VHDX, VDI, VHD; raw when nothing matches) and decode it."""

    name = "image"

    def configure(self, pairs: Iterable[tuple[str, str]]) -> None:
        given = list(pairs)
        super().configure(given)  # every key is one of some decoder's
        self.decoders: list[tuple[Decoder, Any]] = []
        for decoder in DECODERS:
            instance = load_filter(decoder.filter)()
            keys = {param.key for param in params_of(type(instance))}
            instance.debug_flags = self.debug_flags
            instance.configure([(key, value) for key, value in given if key in keys])
            self.decoders.append((decoder, instance))

    def dump_plugin(self) -> None:
        for _, instance in self.decoders:
            instance.dump_plugin()

    def get_ready(self) -> None:
        for _, instance in self.decoders:
            instance.open_below = self.open_below
            instance.final_thread_model = self.final_thread_model
            instance.prepare()
        with self.below_if_available() as below:
            if below is not None:
                found = self.probe(below)
                if found is not None:
                    found.check_default_export()

    def cleanup(self) -> None:
        for _, instance in getattr(self, "decoders", []):
            instance.cleanup()

    def probe(self, below: Layer) -> Any:
        """The decoder filter for the bytes of `below`, or None (raw)."""
        read, size = layer_reader(below), below.get_size()
        for decoder, instance in self.decoders:
            if decoder.matches(read, size):
                return instance
        return None

    def open(self, next_open: OpenNext, readonly: bool, export_name: str) -> FilterHandle:
        below = next_open(readonly, export_name)
        try:
            found = self.probe(below)
        except BaseException:
            below.close()
            raise
        if found is None:
            return FilterHandle(self, below, readonly, export_name)
        unused = [below]

        def reuse_probed(ro: bool, name: str) -> Layer:
            # The decoder opens the export we probed: hand it that layer rather than open it twice.
            if unused and name == export_name:
                return unused.pop()
            return next_open(ro, name)

        try:
            return found.open(reuse_probed, readonly, export_name)
        finally:
            if unused:
                below.close()


FILTER = ImageFilter


def _declare_decoder_params() -> None:
    """Every decoder's parameters are the image filter's too (so the command line reaches them)."""
    for decoder in DECODERS:
        for param in params_of(load_filter(decoder.filter)):
            if not hasattr(ImageFilter, param.attr):
                setattr(ImageFilter, param.attr, param)
    ImageFilter.debug_flag_help = {flag: text for decoder in DECODERS
                                   for flag, text in load_filter(decoder.filter).debug_flag_help.items()}


_declare_decoder_params()
