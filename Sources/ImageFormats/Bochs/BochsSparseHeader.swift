import BlockEngine

/// The 256-byte header of a Bochs "sparse" image (bximage -imgmode=sparse), versions 1 and 2.
/// Layout: header, a page table of `pages` little-endian u32 entries (0xFFFFFFFF: not
/// here), then whole pages from `dataStart`, the first page boundary past the table.
/// QEMU does not read this format (it probes as raw and would show the header as disk bytes).
public struct BochsSparseHeader: Sendable {
    public static let magic: UInt32 = 0x0246_8ACE
    public static let headerSize: UInt64 = 256
    public static let notAllocated: UInt32 = 0xFFFF_FFFF

    public var version: UInt32
    public var pageSize: UInt32
    public var pages: UInt32
    /// Guest bytes: the header's disk size (v2), or every page (v1, which has no such field).
    public var diskSize: UInt64

    public var pageTableBytes: UInt64 { UInt64(pages) * 4 }
    /// Where physical page 0 starts: the first page boundary at or past the page table's end.
    public var dataStart: UInt64 {
        let preamble = Self.headerSize + pageTableBytes
        return (preamble + UInt64(pageSize) - 1) / UInt64(pageSize) * UInt64(pageSize)
    }

    /// The magic alone: with `--format bochs`, a sparse image with a bad version is
    /// reported as such rather than as a bad redolog.
    public static func hasMagic(_ b: [UInt8]) -> Bool { b.count >= 4 && le32(b, 0) == magic }

    public static func probe(_ b: [UInt8]) -> Bool {
        b.count >= 8 && le32(b, 0) == magic && (le32(b, 4) == 1 || le32(b, 4) == 2)
    }

    public static func read(from file: ImageFile) throws -> BochsSparseHeader {
        let path = file.path
        let size = try file.size()
        guard size >= headerSize else {
            throw BlockError.truncated(file: path, what: "Bochs sparse header", offset: 0, needed: headerSize, fileSize: size)
        }
        let b = try file.readBytes(count: Int(headerSize), at: 0, what: "Bochs sparse header")
        func bad(_ field: String, _ detail: String) -> BlockError { .invalid(file: path, field: field, detail: detail) }
        guard le32(b, 0) == magic else { throw bad("Bochs sparse magic", "not a Bochs sparse image") }
        let version = le32(b, 4)
        guard version == 1 || version == 2 else { throw bad("Bochs sparse version", "\(version) (expected 1 or 2)") }
        let pageSize = le32(b, 8), pages = le32(b, 12)
        guard pageSize >= 512, UInt64(pageSize).isPowerOfTwo else {
            throw bad("page size", "\(pageSize) is not a power of two of at least 512")
        }
        guard pages > 0 else { throw bad("page count", "0") }
        let allPages = UInt64(pageSize) * UInt64(pages)
        let disk = version == 2 ? le64(b, 16) : allPages
        try VirtualSize.checked(disk, file: path, field: "Bochs sparse disk size")
        guard disk <= allPages else {
            throw bad("disk size", "\(disk) bytes is more than its \(pages) pages of \(pageSize) bytes hold")
        }
        let h = BochsSparseHeader(version: version, pageSize: pageSize, pages: pages, diskSize: disk)
        guard headerSize + h.pageTableBytes <= size else {
            throw BlockError.truncated(file: path, what: "Bochs sparse page table", offset: headerSize,
                                       needed: h.pageTableBytes, fileSize: size)
        }
        return h
    }
}
