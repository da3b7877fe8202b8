"""Repository formats (localfs-1.0, ...) and image formats (raw, qcow2 via qemu-img)."""
