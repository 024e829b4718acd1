"""Faults injected into real writers, to show that surgery's checks catch them and leave nothing."""


def flipping_last_byte(write_shard):
    """`shards.write_shard` that writes its shard, then flips the file's last byte (a disk or copy
    error after the checksums were taken)."""

    def write(path, *args, **kwargs):
        written = write_shard(path, *args, **kwargs)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        return written

    return write
