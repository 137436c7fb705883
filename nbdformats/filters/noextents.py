"""noextents filter: hide sparseness, so the disk appears fully allocated
(nbdkit-noextents-filter compatible)."""

from __future__ import annotations

from ..api.chain import Filter, FilterHandle


class NoextentsFilter(Filter):
    """Report the whole disk as allocated data (disable block status)."""

    name = "noextents"
    resize_passthrough = True

    class Handle(FilterHandle):
        def can_extents(self) -> bool:
            return False  # the chain then reports one data extent for any range


FILTER = NoextentsFilter
