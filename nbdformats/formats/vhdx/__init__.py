"""VHDX (Microsoft's [MS-VHDX] Virtual Hard Disk v2 File Format)."""
