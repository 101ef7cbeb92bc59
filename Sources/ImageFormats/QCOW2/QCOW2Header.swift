import BlockEngine

/// The qcow2 header (versions 2 and 3, big-endian), its extensions and backing file name,
/// validated as QEMU does, plus checks QEMU leaves to later (tables inside the file).
public struct QCOW2Header: Sendable {
    public static let magic: [UInt8] = [0x51, 0x46, 0x49, 0xFB]  // "QFI\xfb"
    public static let incompatibleDirty: UInt64 = 1 << 0
    public static let incompatibleCorrupt: UInt64 = 1 << 1
    public static let incompatibleDataFile: UInt64 = 1 << 2
    static let incompatibleCompression: UInt64 = 1 << 3
    static let incompatibleExtendedL2: UInt64 = 1 << 4
    static let knownIncompatible: UInt64 = 0x1F
    /// QEMU's limits: L1 of at most 32 MiB, backing name of at most 1023 bytes.
    static let maxL1Bytes: UInt64 = 32 << 20
    public static let maxL1Entries: UInt64 = maxL1Bytes / 8
    static let maxBackingName = 1023

    public var version: UInt32
    public var clusterBits: UInt32
    public var size: UInt64
    public var l1Entries: UInt32
    public var l1Offset: UInt64
    public var snapshots: UInt32
    public var snapshotsOffset: UInt64
    public var incompatible: UInt64
    public var compatible: UInt64
    public var autoclear: UInt64
    public var headerLength: UInt32
    /// 0 deflate, 1 zstd.
    public var compressionType: UInt8
    public var backingName: String?
    /// From the backing-format extension ("raw", "qcow2", ...), when present.
    public var backingFormat: String?
    /// Names of incompatible features from the feature-name table, by bit.
    public var featureNames: [Int: String] = [:]
    public var hasBitmaps = false
    /// The bitmaps extension: count, directory size and offset (for the refcount walk).
    public var bitmapCount: UInt32 = 0
    public var bitmapDirectorySize: UInt64 = 0
    public var bitmapDirectoryOffset: UInt64 = 0
    public var refcountTableOffset: UInt64 = 0
    public var refcountTableClusters: UInt32 = 0
    /// log2 of the refcount width in bits (v2: always 4, 16-bit refcounts).
    public var refcountOrder: UInt32 = 4
    public var refcountBits: UInt64 { 1 << UInt64(refcountOrder) }
    public static let compatibleLazyRefcounts: UInt64 = 1 << 0
    static let autoclearBitmaps: UInt64 = 1 << 0
    /// Where the fields a writer changes live in the header.
    public enum Field { public static let refcountTableOffset = 48, refcountTableClusters = 56, incompatible = 72, autoclear = 88 }
    /// QEMU's limit on the refcount table (8 MiB).
    static let maxRefcountTableBytes: UInt64 = 8 << 20

    public var clusterSize: UInt64 { 1 << UInt64(clusterBits) }
    public var extendedL2: Bool { incompatible & Self.incompatibleExtendedL2 != 0 }
    /// Bytes per L2 entry: 16 with extended L2 (entry + subcluster bitmap), else 8.
    public var l2EntryBytes: UInt64 { extendedL2 ? 16 : 8 }
    public var l2Entries: UInt64 { clusterSize / l2EntryBytes }
    /// Guest bytes one L1 entry covers.
    public var l1Coverage: UInt64 { clusterSize * l2Entries }

    public static func probe(_ b: [UInt8]) -> Bool {
        b.count >= 8 && b.starts(with: magic) && (be32(b, 4) == 2 || be32(b, 4) == 3)
    }

    public static func read(from file: ImageFile) throws -> QCOW2Header {
        let path = file.path
        let fileSize = try file.size()
        func bad(_ field: String, _ detail: String) -> BlockError { .invalid(file: path, field: field, detail: detail) }
        guard fileSize >= 72 else { throw BlockError.truncated(file: path, what: "qcow2 header", offset: 0, needed: 72, fileSize: fileSize) }
        let first = try file.readBytes(count: Int(min(fileSize, 512)), at: 0, what: "qcow2 header")
        guard first.starts(with: magic) else { throw bad("qcow2 magic", "not a qcow2 image") }
        let version = be32(first, 4)
        guard version == 2 || version == 3 else {
            throw BlockError.unsupported(file: path, feature: "qcow2 version \(version) (only 2 and 3 exist)")
        }
        let clusterBits = be32(first, 20)
        guard (9...21).contains(clusterBits) else { throw bad("cluster bits", "\(clusterBits) (QEMU allows 9-21: 512 B to 2 MiB)") }
        let clusterSize = UInt64(1) << UInt64(clusterBits)
        // Header, extensions and backing name all live in the first cluster.
        let head = try file.readBytes(count: Int(min(fileSize, clusterSize)), at: 0, what: "qcow2 header cluster")
        var h = QCOW2Header(version: version, clusterBits: clusterBits, size: be64(head, 24), l1Entries: be32(head, 36),
                            l1Offset: be64(head, 40), snapshots: be32(head, 60), snapshotsOffset: be64(head, 64), incompatible: 0, compatible: 0,
                            autoclear: 0, headerLength: 72, compressionType: 0)
        h.refcountTableOffset = be64(head, 48)
        h.refcountTableClusters = be32(head, 56)
        let cryptMethod = be32(head, 32)
        if cryptMethod != 0 {
            throw BlockError.unsupported(file: path, feature: cryptMethod == 2 ? "LUKS-encrypted qcow2" : "AES-encrypted qcow2 (crypt method \(cryptMethod))")
        }
        if version == 3 {
            guard head.count >= 104 else { throw BlockError.truncated(file: path, what: "qcow2 v3 header", offset: 0, needed: 104, fileSize: fileSize) }
            h.incompatible = be64(head, 72); h.compatible = be64(head, 80); h.autoclear = be64(head, 88)
            let refcountOrder = be32(head, 96)
            guard refcountOrder <= 6 else { throw bad("refcount order", "\(refcountOrder) (at most 6)") }
            h.refcountOrder = refcountOrder
            h.headerLength = be32(head, 100)
            guard h.headerLength >= 104, h.headerLength % 8 == 0, UInt64(h.headerLength) <= min(clusterSize, UInt64(head.count)) else {
                throw bad("header length", "\(h.headerLength) (must be a multiple of 8 from 104 to the cluster size)")
            }
            if h.headerLength > 104 { h.compressionType = head[104] }
        }
        // Extensions: after the header, up to the backing name (or the cluster's end).
        let backingOffset = be64(head, 8), backingSize = be32(head, 16)
        let extensionsEnd = backingOffset != 0 ? backingOffset : UInt64(head.count)
        guard backingOffset <= UInt64(head.count) else { throw bad("backing file offset", "\(backingOffset) lies outside the header cluster") }
        try h.readExtensions(head, from: Int(h.headerLength), to: Int(extensionsEnd), path: path)

        let unknown = h.incompatible & ~knownIncompatible
        if unknown != 0 {
            let bits = (0..<64).filter { unknown >> UInt64($0) & 1 != 0 }
            let named = bits.map { b in h.featureNames[b].map { "\(b) (\($0))" } ?? "\(b)" }
            throw BlockError.unsupported(file: path, feature: "incompatible qcow2 feature bit \(named.joined(separator: ", "))")
        }
        if h.incompatible & incompatibleDataFile != 0 {
            throw BlockError.unsupported(file: path, feature: "qcow2 with an external data file")
        }
        guard (h.incompatible & incompatibleCompression != 0) == (h.compressionType != 0) else {
            throw bad("compression type", "\(h.compressionType) does not agree with incompatible feature bit 3")
        }
        guard h.compressionType <= 1 else { throw BlockError.unsupported(file: path, feature: "qcow2 compression type \(h.compressionType)") }
        if h.extendedL2 && clusterBits < 14 { throw bad("cluster bits", "\(clusterBits) is too small for extended L2 (at least 14)") }

        if backingOffset != 0 {
            guard backingSize > 0, backingSize <= UInt32(maxBackingName), backingOffset + UInt64(backingSize) <= UInt64(head.count) else {
                throw bad("backing file name", "\(backingSize) bytes at \(backingOffset) does not fit the header cluster (limit \(maxBackingName))")
            }
            let bytes = head[Int(backingOffset) ..< Int(backingOffset) + Int(backingSize)]
            guard !bytes.contains(0), let name = String(validating: bytes, as: UTF8.self) else {
                throw bad("backing file name", "contains a NUL byte or is not UTF-8")
            }
            h.backingName = name
        }

        guard h.size % 512 == 0 else { throw bad("size", "\(h.size) is not a multiple of 512") }
        guard h.size <= 1 << 62 else { throw bad("size", "\(h.size) is too large") }
        try h.checkL1(offset: h.l1Offset, entries: h.l1Entries, diskSize: h.size, fileSize: fileSize, path: path, what: "L1")
        return h
    }

    /// An L1 table (the active one or a snapshot's) must cover the disk, stay within QEMU's
    /// 32 MiB limit, start on a cluster past the header and lie inside the file.
    func checkL1(offset: UInt64, entries: UInt32, diskSize: UInt64, fileSize: UInt64, path: String, what: String) throws {
        func bad(_ field: String, _ detail: String) -> BlockError { .invalid(file: path, field: field, detail: detail) }
        // (diskSize / c) rounded up without adding to diskSize: a hostile size near 2^64 must not trap.
        let needed = diskSize / l1Coverage + (diskSize % l1Coverage == 0 ? 0 : 1)
        guard UInt64(entries) >= needed else { throw bad("\(what) size", "\(entries) entries; a \(diskSize)-byte disk needs \(needed)") }
        let bytes = UInt64(entries) * 8
        guard bytes <= Self.maxL1Bytes else { throw bad("\(what) size", "\(entries) entries is larger than QEMU's 32 MiB limit") }
        guard entries > 0 else { return }
        guard offset % clusterSize == 0, offset >= clusterSize else {
            throw bad("\(what) table offset", "\(offset) is not a cluster boundary past the header")
        }
        guard offset <= fileSize, bytes <= fileSize - offset else {
            throw BlockError.truncated(file: path, what: "qcow2 \(what) table", offset: offset, needed: bytes, fileSize: fileSize)
        }
    }

    /// Where a compressed L2 entry's bytes lie: the host offset and how many bytes from it
    /// (whole 512-byte sectors counted from the sector the offset is in).
    func compressedRange(_ e: UInt64) -> (host: UInt64, bytes: UInt64) {
        let x = 62 - (UInt64(clusterBits) - 8)
        let host = e & ((1 << x) - 1)
        let sectors = ((e >> x) & ((1 << (UInt64(clusterBits) - 8)) - 1)) + 1
        return (host, sectors * 512 - (host & 511))
    }

    /// The refcount table must start on a cluster past the header, lie inside the file and
    /// stay within QEMU's 8 MiB (checked when the image is opened for writing or checked).
    func checkRefcountTable(fileSize: UInt64, path: String) throws {
        let bytes = UInt64(refcountTableClusters) * clusterSize
        guard refcountTableClusters > 0, bytes <= Self.maxRefcountTableBytes else {
            throw BlockError.invalid(file: path, field: "refcount table size", detail: "\(refcountTableClusters) clusters (QEMU allows 1 to \(Self.maxRefcountTableBytes / clusterSize))")
        }
        guard refcountTableOffset % clusterSize == 0, refcountTableOffset >= clusterSize else {
            throw BlockError.invalid(file: path, field: "refcount table offset", detail: "\(refcountTableOffset) is not a cluster boundary past the header")
        }
        guard refcountTableOffset <= fileSize, bytes <= fileSize - refcountTableOffset else {
            throw BlockError.truncated(file: path, what: "qcow2 refcount table", offset: refcountTableOffset, needed: bytes, fileSize: fileSize)
        }
    }

    /// Writes one big-endian header field in place.
    public static func writeField(_ file: ImageFile, at offset: Int, _ value: UInt64, bytes: Int) throws {
        try file.write((0..<bytes).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64(bytes - 1 - $0))) }, at: UInt64(offset))
    }

    private mutating func readExtensions(_ head: [UInt8], from start: Int, to end: Int, path: String) throws {
        var at = start
        while at + 8 <= end {
            let type = be32(head, at), length = Int(be32(head, at + 4))
            if type == 0 { return }
            guard length <= end - at - 8 else {
                throw BlockError.invalid(file: path, field: "header extension 0x\(String(type, radix: 16))",
                                         detail: "\(length) bytes run past the end of the extension area")
            }
            let data = head[(at + 8) ..< (at + 8 + length)]
            switch type {
            case 0xE279_2ACA:
                backingFormat = String(decoding: data.prefix { $0 != 0 }, as: UTF8.self)
            case 0x6803_F857:
                for e in stride(from: data.startIndex, to: data.endIndex - 47, by: 48) where data[e] == 0 {
                    featureNames[Int(data[e + 1])] = String(decoding: data[(e + 2) ..< (e + 48)].prefix { $0 != 0 }, as: UTF8.self)
                }
            case 0x2385_2875:
                hasBitmaps = true
                if length >= 24 {
                    let d = Array(data)
                    bitmapCount = be32(d, 0)
                    bitmapDirectorySize = be64(d, 8)
                    bitmapDirectoryOffset = be64(d, 16)
                }
            default:
                break  // other extensions do not change what the guest reads
            }
            at += 8 + (length + 7) / 8 * 8
        }
    }
}
