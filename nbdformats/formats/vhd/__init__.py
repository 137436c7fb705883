"""VHD (Microsoft's Virtual Hard Disk Image Format Specification, October 2006; qemu's vpc)."""
