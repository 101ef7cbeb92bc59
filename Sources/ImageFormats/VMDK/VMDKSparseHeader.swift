import BlockEngine

/// The hosted sparse extent header ("KDMV"), validated as QEMU does plus the divide-by-zero
/// and bounds checks it misses.
public struct VMDKSparseHeader: Sendable {
    public static let magic: UInt32 = 0x564D_444B
    /// VMDK3 / ESX "COWD" sparse extents (vmfsSparse deltas), 4096-entry grain tables.
    public static let cowdMagic: UInt32 = 0x4457_4F43
    public static let gdAtEnd: UInt64 = 0xFFFF_FFFF_FFFF_FFFF
    static let flagRedundantGT: UInt32 = 1 << 1
    static let flagZeroedGrain: UInt32 = 1 << 2
    static let flagCompressed: UInt32 = 1 << 16
    static let flagMarkers: UInt32 = 1 << 17

    public var version: UInt32
    public var flags: UInt32
    public var capacity: UInt64        // sectors
    public var grainSize: UInt64       // sectors
    public var descriptorOffset: UInt64
    public var descriptorSize: UInt64
    public var numGTEsPerGT: UInt32
    public var rgdOffset: UInt64
    public var gdOffset: UInt64
    public var overHead: UInt64

    public var grainBytes: UInt64 { grainSize * 512 }
    public var gtBytes: Int { Int(numGTEsPerGT) * 4 }
    /// Guest bytes one grain table covers.
    public var gtCoverage: UInt64 { UInt64(numGTEsPerGT) * grainBytes }
    public var gdEntries: UInt64 { (capacity * 512 + gtCoverage - 1) / gtCoverage }
    public var hasRedundantGD: Bool { flags & Self.flagRedundantGT != 0 && rgdOffset != 0 }
    public var zeroedGrains: Bool { flags & Self.flagZeroedGrain != 0 }
    public var isCompressed: Bool { flags & Self.flagCompressed != 0 }
    public var hasMarkers: Bool { flags & Self.flagMarkers != 0 }

    public var compressAlgorithm: UInt16
    public var isCOWD = false

    public static func probe(_ b: [UInt8]) -> Bool { b.count >= 4 && (le32(b, 0) == magic || le32(b, 0) == cowdMagic) }

    /// A COWD header in the same terms: GD at gdOffset with numGDEntries entries, no
    /// redundant directory, no embedded descriptor, grains after the tables.
    static func parseCOWD(_ b: [UInt8], path: String) throws -> VMDKSparseHeader {
        let gdEntries = UInt64(le32(b, 24))
        let gdOffset = UInt64(le32(b, 20))
        var h = VMDKSparseHeader(version: 1, flags: 0, capacity: UInt64(le32(b, 12)), grainSize: UInt64(le32(b, 16)),
                                 descriptorOffset: 0, descriptorSize: 0, numGTEsPerGT: 4096, rgdOffset: 0,
                                 gdOffset: gdOffset, overHead: gdOffset + (gdEntries * 4 + 511) / 512, compressAlgorithm: 0)
        h.isCOWD = true
        h.cowdGDEntries = gdEntries
        return h
    }
    var cowdGDEntries: UInt64 = 0

    static func parse(_ b: [UInt8], path: String) throws -> VMDKSparseHeader {
        guard le32(b, 0) == magic else { throw BlockError.invalid(file: path, field: "VMDK magic", detail: "not a KDMV sparse extent") }
        return VMDKSparseHeader(version: le32(b, 4), flags: le32(b, 8), capacity: le64(b, 12), grainSize: le64(b, 20),
                                descriptorOffset: le64(b, 28), descriptorSize: le64(b, 36), numGTEsPerGT: le32(b, 44),
                                rgdOffset: le64(b, 48), gdOffset: le64(b, 56), overHead: le64(b, 64),
                                compressAlgorithm: UInt16(b[77]) | UInt16(b[78]) << 8)
    }

    /// `size` is the file's, when the caller has it already; `head`, the file's first bytes
    /// when the caller read them already (at least 512 of them).
    public static func read(from file: ImageFile, size known: UInt64? = nil) throws -> VMDKSparseHeader {
        let path = file.path
        let size = try known ?? file.size()
        guard size >= 512 else { throw BlockError.truncated(file: path, what: "VMDK sparse header", offset: 0, needed: 512, fileSize: size) }
        let first = try file.readBytes(count: 512, at: 0, what: "VMDK sparse header")
        var h = le32(first, 0) == cowdMagic ? try parseCOWD(first, path: path) : try parse(first, path: path)
        if h.gdOffset == gdAtEnd {
            // VMware's streamOptimized layout: the real header is a footer before end-of-stream.
            guard size >= 2048 else { throw BlockError.truncated(file: path, what: "VMDK footer", offset: 0, needed: 2048, fileSize: size) }
            let tail = try file.readBytes(count: 1536, at: size - 1536, what: "VMDK footer")
            guard le32(tail, 8) == 0, le32(tail, 12) == 3, le32(tail, 1024 + 8) == 0, le32(tail, 1024 + 12) == 0 else {
                throw BlockError.invalid(file: path, field: "VMDK footer", detail: "no footer and end-of-stream markers at the end of the file")
            }
            h = try parse(Array(tail[512..<1024]), path: path)
            guard h.gdOffset != gdAtEnd else { throw BlockError.invalid(file: path, field: "VMDK footer", detail: "footer has no grain directory") }
        }
        func bad(_ f: String, _ d: String) -> BlockError { .invalid(file: path, field: f, detail: d) }
        guard h.version >= 1, h.version <= 3 else { throw BlockError.unsupported(file: path, feature: "VMDK sparse version \(h.version)") }
        if h.isCompressed {
            guard h.compressAlgorithm == 1 else {
                throw BlockError.unsupported(file: path, feature: "VMDK compression algorithm \(h.compressAlgorithm)")
            }
        }
        guard h.grainSize.isPowerOfTwo, h.grainSize <= 0x20_0000 else { throw bad("grainSize", "\(h.grainSize) sectors is not a power of two up to 1 GiB") }
        // Each reader of a compressed grain holds it twice (stored and inflated): bounded as
        // qcow2's largest cluster is. VMware and QEMU write 64 KiB grains.
        if h.isCompressed && h.grainSize > 4096 {
            throw bad("grainSize", "\(h.grainSize) sectors is too large for compressed grains (limit 2 MiB)")
        }
        guard h.numGTEsPerGT >= 1, h.numGTEsPerGT <= (h.isCOWD ? 4096 : 512), UInt64(h.numGTEsPerGT).isPowerOfTwo else {
            throw bad("numGTEsPerGT", "\(h.numGTEsPerGT) (must be a power of two up to 512)")
        }
        // Capacity first: everything derived from it (gdEntries) assumes it is bounded.
        guard h.capacity > 0, h.capacity <= UInt64(1) << 40 else { throw bad("capacity", "\(h.capacity) sectors") }
        if h.isCOWD {
            guard h.cowdGDEntries >= h.gdEntries, h.cowdGDEntries <= 32 << 20 else {
                throw bad("numGDEntries", "\(h.cowdGDEntries) does not cover \(h.capacity) sectors (needs \(h.gdEntries))")
            }
        }
        guard h.gdEntries <= 32 << 20 else { throw bad("capacity", "needs \(h.gdEntries) grain directory entries (limit 32 Mi)") }
        let sectors = size / 512
        guard h.overHead <= sectors else { throw BlockError.truncated(file: path, what: "VMDK metadata (overHead)", offset: 0, needed: min(h.overHead, UInt64.max / 512) * 512, fileSize: size) }
        let gdSectors = (h.gdEntries * 4 + 511) / 512
        for (name, off) in [("gdOffset", h.gdOffset)] + (h.hasRedundantGD ? [("rgdOffset", h.rgdOffset)] : []) {
            guard off >= 1, off <= sectors, gdSectors <= sectors - off else {
                throw bad(name, "grain directory at sector \(off) (\(gdSectors) sectors) is outside the \(size)-byte file")
            }
        }
        if h.descriptorOffset != 0 {
            guard h.descriptorSize <= 2048, h.descriptorOffset <= sectors, h.descriptorSize <= sectors - h.descriptorOffset else {
                throw bad("descriptorOffset", "embedded descriptor \(h.descriptorOffset)+\(h.descriptorSize) sectors is outside the file")
            }
        }
        return h
    }
}
