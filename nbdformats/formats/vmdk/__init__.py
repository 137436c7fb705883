"""VMDK (VMware's "Virtual Disk Format 1.1"): descriptors, hosted sparse extents (monolithic and
split, streamOptimized with compressed grains), flat extents, and delta disks' parent links."""
