import BlockEngine
import Glibc

/// Creates an empty qcow2 image laid out as qemu-img lays it out: the header cluster, the
/// refcount table, its refcount blocks, the L1 table, and (with metadata preallocation)
/// every L2 table and data cluster, all counted by the refcount blocks.
public enum QCOW2Create {
    public struct Options: Sendable {
        public var version: UInt32 = 3
        public var clusterSize: UInt64 = 65536
        public var refcountBits: UInt64 = 16
        public var extendedL2 = false
        public var lazyRefcounts = false
        public var preallocateMetadata = false
        public var backing: String?
        public var backingFormat: String?
        public init() {}
    }

    public static func create(path: String, size: UInt64, options o: Options) throws {
        func usage(_ text: String) -> BlockError { .usage("\(path): \(text)") }
        let cs = o.clusterSize
        guard cs.isPowerOfTwo, (512 ... (2 << 20)).contains(cs) else { throw usage("cluster size \(cs) must be a power of two from 512 to 2M") }
        guard o.refcountBits.isPowerOfTwo, o.refcountBits <= 64 else { throw usage("refcount bits \(o.refcountBits) must be 1, 2, 4, 8, 16, 32 or 64") }
        guard o.version == 3 || o.refcountBits == 16 else { throw usage("compat 0.10 images have 16-bit refcounts only") }
        guard o.version == 3 || !o.extendedL2 && !o.lazyRefcounts else { throw usage("extended L2 and lazy refcounts need compat 1.1") }
        guard !o.extendedL2 || cs >= 16384 else { throw usage("extended L2 needs clusters of at least 16K") }
        guard size % 512 == 0 else { throw usage("size \(size) is not a multiple of 512") }
        try VirtualSize.checked(size, file: path, field: "size", sectors: false)
        let bits = UInt64(cs.trailingZeroBitCount)
        var header = QCOW2Header(version: o.version, clusterBits: UInt32(bits), size: size, l1Entries: 0, l1Offset: 0, snapshots: 0,
                                 snapshotsOffset: 0, incompatible: o.extendedL2 ? QCOW2Header.incompatibleExtendedL2 : 0,
                                 compatible: o.lazyRefcounts ? QCOW2Header.compatibleLazyRefcounts : 0, autoclear: 0,
                                 headerLength: o.version == 3 ? 112 : 72, compressionType: 0)
        header.refcountOrder = UInt32(o.refcountBits.trailingZeroBitCount)
        let l1Entries = (size + header.l1Coverage - 1) / header.l1Coverage
        guard l1Entries * 8 <= QCOW2Header.maxL1Bytes else { throw usage("size \(size) needs an L1 table larger than QEMU's 32 MiB; use larger clusters") }
        let l1Clusters = max(1, (l1Entries * 8 + cs - 1) / cs)
        let l2Count = o.preallocateMetadata ? l1Entries : 0
        let dataClusters = o.preallocateMetadata ? (size + cs - 1) / cs : 0
        // Refcount blocks k and table clusters t that cover everything, themselves included.
        let perBlock = cs * 8 / o.refcountBits
        var k: UInt64 = 1, t: UInt64 = 1
        while true {
            let total = 1 + t + k + l1Clusters + l2Count + dataClusters
            let k2 = (total + perBlock - 1) / perBlock, t2 = (k2 * 8 + cs - 1) / cs
            if k2 <= k && t2 <= t { break }
            k = max(k, k2); t = max(t, t2)
        }
        guard t * cs <= QCOW2Header.maxRefcountTableBytes else { throw usage("refcount table would exceed QEMU's 8 MiB; use larger clusters or wider refcounts") }
        let tableAt: UInt64 = 1, blocksAt = 1 + t, l1At = 1 + t + k, l2At = l1At + l1Clusters, dataAt = l2At + l2Count
        let total = dataAt + dataClusters
        header.l1Entries = UInt32(l1Entries)
        header.l1Offset = l1At * cs
        header.refcountTableOffset = tableAt * cs
        header.refcountTableClusters = UInt32(t)

        try ImageFile.createComplete(path: path) { file in
            try file.write(try headerCluster(header, options: o), at: 0)
            var table = [UInt8](repeating: 0, count: Int(t * cs))
            for b in 0..<k { put64be(&table, Int(b) * 8, (blocksAt + b) * cs) }
            try file.write(table, at: tableAt * cs)
            let codec = RefcountCodec(bits: o.refcountBits)
            for b in 0..<k {
                var block = [UInt8](repeating: 0, count: Int(cs))
                for c in b * perBlock ..< min(total, (b + 1) * perBlock) { codec.set(&block, Int(c - b * perBlock), 1) }
                try file.write(block, at: (blocksAt + b) * cs)
            }
            var l1 = [UInt8](repeating: 0, count: Int(l1Clusters * cs))
            let step = header.l2EntryBytes
            for i in 0..<l2Count {
                put64be(&l1, Int(i) * 8, (l2At + i) * cs | QCOW2Driver.copiedFlag)
                var l2 = [UInt8](repeating: 0, count: Int(cs))
                for j in 0..<header.l2Entries {
                    let cluster = i * header.l2Entries + j
                    guard cluster < dataClusters else { break }
                    put64be(&l2, Int(j * step), (dataAt + cluster) * cs | QCOW2Driver.copiedFlag)
                    if o.extendedL2 { put64be(&l2, Int(j * step + 8), 0xFFFF_FFFF) }
                }
                try file.write(l2, at: (l2At + i) * cs)
            }
            try file.write(l1, at: l1At * cs)
            try file.truncate(to: total * cs)
        }
    }

    /// The header, its extensions (backing format, feature names) and the backing name.
    static func headerCluster(_ h: QCOW2Header, options o: Options) throws -> [UInt8] {
        var b = [UInt8](repeating: 0, count: Int(h.clusterSize))
        func put32(_ o: Int, _ v: UInt64) { put32be(&b, o, UInt32(v)) }
        b.replaceSubrange(0..<4, with: QCOW2Header.magic)
        put32(4, UInt64(h.version))
        put32(20, UInt64(h.clusterBits))
        put64be(&b, 24, h.size)
        put32(36, UInt64(h.l1Entries))
        put64be(&b, 40, h.l1Offset)
        put64be(&b, 48, h.refcountTableOffset)
        put32(56, UInt64(h.refcountTableClusters))
        var at = 72
        if h.version == 3 {
            put64be(&b, 72, h.incompatible)
            put64be(&b, 80, h.compatible)
            put64be(&b, 88, h.autoclear)
            put32(96, UInt64(h.refcountOrder))
            put32(100, UInt64(h.headerLength))
            at = Int(h.headerLength)
        }
        // The end marker and the backing name must fit after the extensions.
        let reserve = 8 + (o.backing?.utf8.count ?? 0)
        func fits(_ data: [UInt8]) -> Bool { at + 8 + (data.count + 7) / 8 * 8 + reserve <= b.count }
        func extensionHeader(_ type: UInt64, _ data: [UInt8]) throws {
            let padded = (data.count + 7) / 8 * 8
            guard fits(data) else { throw BlockError.usage("the header, its extensions and the backing name do not fit one \(b.count)-byte cluster") }
            put32(at, type); put32(at + 4, UInt64(data.count))
            b.replaceSubrange(at + 8 ..< at + 8 + data.count, with: data)
            at += 8 + padded
        }
        if let f = o.backingFormat { try extensionHeader(0xE279_2ACA, Array(f.utf8)) }
        if h.version == 3 {
            // Feature names, so tools that do not know a bit can still name it.
            var names: [UInt8] = []
            for (type, bit, name) in [(0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"), (0, 3, "compression type"),
                                      (0, 4, "extended L2 entries"), (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data")] {
                var e = [UInt8](repeating: 0, count: 48)
                e[0] = UInt8(type); e[1] = UInt8(bit)
                e.replaceSubrange(2 ..< 2 + name.utf8.count, with: Array(name.utf8))
                names += e
            }
            if fits(names) { try extensionHeader(0x6803_F857, names) }  // optional: left out of tiny clusters
        }
        at += 8  // end of extensions (type 0, length 0)
        if let name = o.backing {
            let bytes = Array(name.utf8)
            guard !bytes.isEmpty, bytes.count <= QCOW2Header.maxBackingName, !bytes.contains(0), at + bytes.count <= b.count else {
                throw BlockError.usage("backing file name must be 1 to \(QCOW2Header.maxBackingName) bytes without NUL")
            }
            put64be(&b, 8, UInt64(at))
            put32(16, UInt64(bytes.count))
            b.replaceSubrange(at ..< at + bytes.count, with: bytes)
        }
        return b
    }
}
