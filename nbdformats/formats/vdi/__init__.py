"""VDI, VirtualBox's disk image (VirtualBox's VDICore.h; qemu's vdi.c)."""
