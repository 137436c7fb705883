"""nofilter filter: pass every request through unchanged (nbdkit-nofilter-filter compatible)."""

from __future__ import annotations

from ..api.chain import Filter, FilterHandle


class NofilterFilter(Filter):
    """Pass every request through unchanged (for testing a filter chain)."""

    name = "nofilter"
    resize_passthrough = True

    class Handle(FilterHandle):
        pass  # every method of FilterHandle passes to the layer below


FILTER = NofilterFilter
