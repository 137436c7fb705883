"""XenServer/XCP-ng exports (XVA): the VM description (ovaxml) and where each disk's chunks lie
in the tar (archive)."""
