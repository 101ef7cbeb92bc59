/// A disk seen through one of its dirty bitmaps: dirty granules read the disk's current
/// bytes (the view's backing device is the disk itself), clean granules read zeros and are
/// holes for SEEK_DATA/SEEK_HOLE and st_blocks. A SEEK_DATA-aware copier then copies only
/// what changed. Read-only; closing it leaves the disk open.
public final class DirtyBitmapView: ImageDriver {
    public let bits: DirtyBitmap
    public let file: ImageFile
    public let info: ImageInfo

    public init(disk: BlockDevice, bits: DirtyBitmap, name: String) {
        self.bits = bits
        file = disk.driver.file
        info = ImageInfo(format: "dirty bitmap '\(name)'", virtualSize: disk.virtualSize, clusterSize: bits.granularity)
    }

    /// The view as a device: its backing is the disk, so dirty (unallocated here) bytes are
    /// read from it.
    public static func device(over disk: BlockDevice, bits: DirtyBitmap, name: String) -> BlockDevice {
        BlockDevice(driver: DirtyBitmapView(disk: disk, bits: bits, name: name), backing: disk)
    }

    public func map(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        let r = bits.run(from: offset, maxLength: maxLength)
        let n = max(r.length, 1)
        return r.dirty ? .unallocated(length: n) : .zero(length: n)
    }

    /// Dirty granules count as data even where the disk itself is a hole there, so a copier
    /// writes their zeros too and st_blocks counts the dirty bytes.
    public func status(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        let r = bits.run(from: offset, maxLength: maxLength)
        let n = max(r.length, 1)
        return r.dirty ? .data(host: 0, length: n) : .zero(length: n)
    }

    public func close() throws {}
}
