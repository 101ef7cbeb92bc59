import BlockEngine

/// The QED header (all fields little-endian), parsed and validated the way QEMU does, plus
/// the `table_size = 1` images QEMU 7.2 wrongly refuses.
public struct QEDHeader: Equatable, Sendable {
    public static let magic: UInt32 = 0x0044_4551 // "QED\0"
    public static let featureBackingFile: UInt64 = 0x1
    public static let featureNeedCheck: UInt64 = 0x2
    public static let featureBackingNoProbe: UInt64 = 0x4
    static let knownFeatures: UInt64 = 0x7
    static let minCluster: UInt64 = 4096, maxCluster: UInt64 = 64 << 20
    static let maxBackingName = 1023

    public var clusterSize: UInt32
    public var tableSize: UInt32
    public var headerSize: UInt32
    public var features: UInt64
    public var compatFeatures: UInt64
    public var autoclearFeatures: UInt64
    public var l1TableOffset: UInt64
    public var imageSize: UInt64
    public var backingNameOffset: UInt32
    public var backingNameSize: UInt32

    /// Entries per L1/L2 table.
    public var entriesPerTable: UInt64 { UInt64(tableSize) * UInt64(clusterSize) / 8 }
    public var tableBytes: UInt64 { UInt64(tableSize) * UInt64(clusterSize) }
    public var headerBytes: UInt64 { UInt64(headerSize) * UInt64(clusterSize) }
    /// Guest bytes one L2 table covers.
    public var l2Coverage: UInt64 { entriesPerTable * UInt64(clusterSize) }
    public var hasBacking: Bool { features & Self.featureBackingFile != 0 }

    public static func probe(_ bytes: [UInt8]) -> Bool {
        bytes.count >= 4 && bytes[0] == 0x51 && bytes[1] == 0x45 && bytes[2] == 0x44 && bytes[3] == 0
    }

    /// Parses and validates the 64-byte header of `file`.
    public static func read(from file: ImageFile) throws -> QEDHeader {
        let path = file.path
        let fileSize = try file.size()
        guard fileSize >= 64 else {
            throw BlockError.truncated(file: path, what: "QED header", offset: 0, needed: 64, fileSize: fileSize)
        }
        let b = try file.readBytes(count: 64, at: 0, what: "QED header")
        let h = QEDHeader(
            clusterSize: le32(b, 4), tableSize: le32(b, 8), headerSize: le32(b, 12),
            features: le64(b, 16), compatFeatures: le64(b, 24), autoclearFeatures: le64(b, 32),
            l1TableOffset: le64(b, 40), imageSize: le64(b, 48),
            backingNameOffset: le32(b, 56), backingNameSize: le32(b, 60))
        guard le32(b, 0) == magic else { throw BlockError.invalid(file: path, field: "QED magic", detail: "not a QED image") }
        try h.validate(path: path, fileSize: fileSize)
        return h
    }

    func validate(path: String, fileSize: UInt64) throws {
        let unknown = features & ~Self.knownFeatures
        if unknown != 0 {
            throw BlockError.unsupported(file: path, feature: "QED incompatible feature bit(s) 0x\(String(unknown, radix: 16))")
        }
        let cs = UInt64(clusterSize)
        guard cs.isPowerOfTwo, cs >= Self.minCluster, cs <= Self.maxCluster else {
            throw BlockError.invalid(file: path, field: "cluster_size", detail: "\(clusterSize) is not a power of two in 4 KiB...64 MiB")
        }
        guard UInt64(tableSize).isPowerOfTwo, tableSize <= 16 else {
            throw BlockError.invalid(file: path, field: "table_size", detail: "\(tableSize) is not a power of two in 1...16")
        }
        try VirtualSize.checked(imageSize, file: path, field: "image_size")
        let n = entriesPerTable
        let (maxSize, o1) = n.multipliedReportingOverflow(by: n)
        let (maxImage, o2) = maxSize.multipliedReportingOverflow(by: cs)
        if !(o1 || o2) && imageSize > maxImage {
            throw BlockError.invalid(file: path, field: "image_size", detail: "\(imageSize) exceeds the maximum \(maxImage) for this geometry")
        }
        let (hdrBytes, o3) = UInt64(headerSize).multipliedReportingOverflow(by: cs)
        guard !o3, hdrBytes <= fileSize else {
            throw BlockError.invalid(file: path, field: "header_size", detail: "\(headerSize) clusters is larger than the file")
        }
        if hasBacking {
            let end = UInt64(backingNameOffset) + UInt64(backingNameSize)
            guard backingNameSize > 0, backingNameSize <= Self.maxBackingName, end <= max(hdrBytes, cs), end <= fileSize else {
                throw BlockError.invalid(file: path, field: "backing_filename_offset/size",
                                         detail: "\(backingNameOffset)+\(backingNameSize) is not inside the header area")
            }
        }
        try checkTableOffset(l1TableOffset, path: path, fileSize: fileSize, what: "l1_table_offset")
    }

    /// A table must be cluster aligned, outside the header area, and wholly inside the file.
    func checkTableOffset(_ off: UInt64, path: String, fileSize: UInt64, what: String) throws {
        let cs = UInt64(clusterSize)
        let (end, o) = off.addingReportingOverflow(tableBytes)
        guard off % cs == 0, off >= headerBytes, off != 0, !o, end <= fileSize.alignedUp(cs) else {
            throw BlockError.invalid(file: path, field: what,
                                     detail: "table at \(off) is unaligned, inside the header or past the end of the \(fileSize)-byte file")
        }
    }

    /// The 64 header bytes.
    public func encoded() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 64)
        put32(&b, 0, Self.magic); put32(&b, 4, clusterSize); put32(&b, 8, tableSize); put32(&b, 12, headerSize)
        put64(&b, 16, features); put64(&b, 24, compatFeatures); put64(&b, 32, autoclearFeatures)
        put64(&b, 40, l1TableOffset); put64(&b, 48, imageSize)
        put32(&b, 56, backingNameOffset); put32(&b, 60, backingNameSize)
        return b
    }
}

