"""qcow2 images (versions 2 and 3), read-only: structs.py (the layouts), header.py (the header
and its extensions), snapshots.py (the internal snapshot table), image.py (L1/L2 mapping,
compressed clusters, subclusters, backing files and LUKS encryption)."""
