import BlockEngine

/// What a qcow2 image of a given size takes on the host, by qemu-img measure's arithmetic:
/// the fully allocated size counts the header cluster, every L2 table, the L1 table, the
/// refcount structures for all of that (found as a fixed point) and the data; the persistent
/// bitmaps count as if every bitmap cluster were allocated.
public enum QCOW2Measure {
    /// `virtualSize` rounded up to clusters, plus the metadata that maps and counts it all.
    public static func fullyAllocated(virtualSize: UInt64, clusterSize cs: UInt64, refcountBits: UInt64, extendedL2: Bool) -> UInt64 {
        let size = (virtualSize + cs - 1) / cs * cs
        let entryBytes: UInt64 = extendedL2 ? 16 : 8
        var meta = cs  // the header
        var l2Entries = size / cs
        l2Entries = (l2Entries + cs / entryBytes - 1) / (cs / entryBytes) * (cs / entryBytes)
        meta += l2Entries * entryBytes
        var l1Entries = l2Entries * entryBytes / cs
        l1Entries = (l1Entries + cs / 8 - 1) / (cs / 8) * (cs / 8)
        meta += l1Entries * 8
        meta += refcountMetadata(clusters: (meta + size) / cs, clusterSize: cs, refcountBits: refcountBits)
        return meta + size
    }

    /// Refcount blocks and table clusters for `clusters` clusters plus themselves.
    static func refcountMetadata(clusters: UInt64, clusterSize cs: UInt64, refcountBits: UInt64) -> UInt64 {
        let perTableCluster = cs / 8, perBlock = cs * 8 / refcountBits
        var table: UInt64 = 0, blocks: UInt64 = 0, n: UInt64 = 0, last: UInt64
        repeat {
            last = n
            blocks = (clusters + table + blocks + perBlock - 1) / perBlock
            table = (blocks + perTableCluster - 1) / perTableCluster
            n = clusters + blocks + table
        } while n != last
        return (blocks + table) * cs
    }

    /// The persistent bitmaps of `file` (a qcow2 image of `diskSize` bytes) written into an
    /// image of `clusterSize` clusters: each bitmap whole, its table, and the directory.
    public static func bitmapsSize(file: ImageFile, header h: QCOW2Header, diskSize: UInt64, clusterSize cs: UInt64) throws -> UInt64 {
        guard h.hasBitmaps, h.autoclear & QCOW2Header.autoclearBitmaps != 0 else { return 0 }
        var total: UInt64 = 0, directory: UInt64 = 0
        for b in try QCOW2Bitmaps.list(file, header: h) {
            let bits = (diskSize + b.granularity - 1) / b.granularity
            let clusters = ((bits + 7) / 8 + cs - 1) / cs
            total += clusters * cs + (clusters * 8 + cs - 1) / cs * cs
            directory += (24 + UInt64(b.nameBytes.count) + 7) / 8 * 8
        }
        return total + (directory + cs - 1) / cs * cs
    }
}
