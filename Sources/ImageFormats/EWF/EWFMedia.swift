import BlockEngine

/// The media an EWF set holds, from its volume (or disk) section; later segments repeat it
/// in a data section. Two layouts: the 94-byte one of the original specification (SMART,
/// EnCase 1) with a 32-bit sector count, and the 1052-byte one of EnCase 2 and later, FTK
/// and linen, with a 64-bit count, media type and flags, and the set's identifier.
public struct EWFMedia: Sendable, Equatable {
    public var chunkCount: UInt32
    public var sectorsPerChunk: UInt32
    public var bytesPerSector: UInt32
    public var sectorCount: UInt64
    /// nil in the short layout, which has none of these.
    public var mediaType: UInt8?
    public var mediaFlags: UInt8?
    public var compressionLevel: UInt8?
    public var errorGranularity: UInt32?
    /// The segment set's GUID (all zeros when the acquiring tool left it out).
    public var setIdentifier: [UInt8]?

    static let shortLayoutBytes = 94
    static let longLayoutBytes = 1052
    /// Largest chunk accepted: 64 MiB (ewfacquire writes at most 32768 sectors of 512 bytes,
    /// 16 MiB); a chunk is inflated whole into memory.
    static let maxChunkBytes: UInt64 = 64 << 20

    public var chunkBytes: UInt64 { UInt64(sectorsPerChunk) * UInt64(bytesPerSector) }
    public var mediaSize: UInt64 { sectorCount * UInt64(bytesPerSector) }
    /// Chunks the media needs (the last may be short).
    public var neededChunks: UInt64 { (mediaSize + chunkBytes - 1) / chunkBytes }

    /// Parses and checks a volume, disk or data section's data.
    static func parse(_ d: [UInt8], file: String, section: String) throws -> EWFMedia {
        func bad(_ detail: String) -> BlockError { .invalid(file: file, field: "EWF \(section) section", detail: detail) }
        let long = d.count >= longLayoutBytes
        guard long || d.count >= shortLayoutBytes else { throw bad("\(d.count) bytes, shorter than either layout (94 or 1052)") }
        let sumAt = long ? 1048 : 90
        let sum = ewfAdler32(d[0..<sumAt])
        guard sum == le32(d, sumAt) else { throw bad("checksum mismatch (damaged)") }
        var m = EWFMedia(chunkCount: le32(d, 4), sectorsPerChunk: le32(d, 8), bytesPerSector: le32(d, 12),
                         sectorCount: long ? le64(d, 16) : UInt64(le32(d, 16)))
        if long {
            m.mediaType = d[0]; m.mediaFlags = d[36]; m.compressionLevel = d[52]; m.errorGranularity = le32(d, 56)
            m.setIdentifier = Array(d[64..<80])
        }
        guard m.bytesPerSector > 0, m.bytesPerSector <= 65536 else { throw bad("\(m.bytesPerSector) bytes per sector") }
        guard m.sectorsPerChunk > 0, m.chunkBytes <= maxChunkBytes else {
            throw bad("\(m.sectorsPerChunk) sectors per chunk of \(m.bytesPerSector) bytes (at most \(maxChunkBytes >> 20) MiB a chunk)")
        }
        let (size, overflow) = m.sectorCount.multipliedReportingOverflow(by: UInt64(m.bytesPerSector))
        guard !overflow else { throw bad("\(m.sectorCount) sectors of \(m.bytesPerSector) bytes: more than a disk can be") }
        try VirtualSize.checked(size, file: file, field: "EWF media size", sectors: false)
        guard m.neededChunks <= UInt64(UInt32.max) else { throw bad("more chunks than the format can count") }
        return m
    }

    /// Whether another segment's copy describes the same media (the set identifier only
    /// when both carry one).
    func sameMedia(as other: EWFMedia) -> Bool {
        guard chunkCount == other.chunkCount, sectorsPerChunk == other.sectorsPerChunk,
              bytesPerSector == other.bytesPerSector, sectorCount == other.sectorCount else { return false }
        if let a = setIdentifier, let b = other.setIdentifier, a.contains(where: { $0 != 0 }), b.contains(where: { $0 != 0 }) {
            return a == b
        }
        return true
    }

    /// Media type as ewfinfo names it.
    var mediaTypeText: String? {
        switch mediaType {
        case nil: return nil
        case 0x00: return "removable disk"
        case 0x01: return "fixed disk"
        case 0x03: return "optical disk (CD/DVD/BD)"
        case 0x0E: return "logical evidence"
        case 0x10: return "memory (RAM)"
        case let t?: return "unknown (0x" + String(t, radix: 16) + ")"
        }
    }

    /// Whether the media flags say a physical device (nil in the short layout).
    var isPhysical: Bool? { mediaFlags.map { $0 & 0x02 != 0 } }

    var compressionText: String? {
        switch compressionLevel {
        case nil: return nil
        case 0: return "no compression"
        case 1: return "good (fast) compression"
        case 2: return "best compression"
        case let c?: return "unknown (\(c))"
        }
    }

    var setIdentifierText: String? {
        guard let g = setIdentifier, g.contains(where: { $0 != 0 }) else { return nil }
        // Stored as a little-endian GUID.
        let order = [3, 2, 1, 0, -1, 5, 4, -1, 7, 6, -1, 8, 9, -1, 10, 11, 12, 13, 14, 15]
        return order.map { $0 < 0 ? "-" : (g[$0] < 16 ? "0" : "") + String(g[$0], radix: 16) }.joined()
    }
}
