#!/usr/bin/python3
"""A fake SD card for flash's tests: a FUSE filesystem holding one file,
`card`, that claims SIZE bytes but stores only SIZE/2: its upper half
lands on its lower half, as on cards that lie about their capacity. Files
are opened direct_io, so the page cache cannot hide the aliasing.

    fakecard.py MOUNTPOINT BACKING SIZE      (runs in the foreground)

With a fourth argument `dies-after-sync`, the card stores all SIZE bytes
but fails every write (EIO) after its first fsync: a card that dies in the
middle of flash's capacity probe, so the probe cannot put its samples back.
"""
import errno
import os
import stat
import sys

from fusepy import FUSE, FuseOSError, Operations


class FakeCard(Operations):
    def __init__(self, backing, size, dies_after_sync=False):
        self.size = size
        self.real = size if dies_after_sync else size // 2
        self.dies_after_sync = dies_after_sync
        self.dead = False
        self.fd = os.open(backing, os.O_RDWR)

    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path == "/card":
            return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": self.size}
        raise FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        return [".", "..", "card"]

    def open(self, path, flags):
        if path != "/card":
            raise FuseOSError(errno.ENOENT)
        return 0

    def _pieces(self, offset, length):
        """(card offset, backing offset, length) pieces, wrapping at real."""
        while length > 0:
            at = offset % self.real
            n = min(length, self.real - at)
            yield at, n
            offset += n
            length -= n

    def read(self, path, size, offset, fh):
        size = max(0, min(size, self.size - offset))
        return b"".join(os.pread(self.fd, n, at) for at, n in self._pieces(offset, size))

    def write(self, path, data, offset, fh):
        if self.dead:
            raise FuseOSError(errno.EIO)
        done = 0
        for at, n in self._pieces(offset, len(data)):
            os.pwrite(self.fd, data[done:done + n], at)
            done += n
        return len(data)

    def truncate(self, path, length, fh=None):
        raise FuseOSError(errno.EPERM)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        os.fsync(self.fd)
        self.dead = self.dies_after_sync
        return 0


if __name__ == "__main__":
    mnt, backing, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dies = sys.argv[4:] == ["dies-after-sync"]
    FUSE(FakeCard(backing, size, dies), mnt, foreground=True, direct_io=True, nothreads=True)
