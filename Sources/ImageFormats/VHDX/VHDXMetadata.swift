import BlockEngine

/// The VHDX metadata region: a table of items (GUID, offset inside the region, length,
/// flags) and the items a disk needs: block size and whether it has a parent, virtual size,
/// logical and physical sector size, the disk's identifier. An unknown item marked required
/// is refused, as the specification asks.
public struct VHDXMetadata: Sendable {
    static let tableBytes = 64 << 10
    static let maxEntries = 2047
    static let fileParameters = VHDXGUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
    static let virtualDiskSize = VHDXGUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
    static let virtualDiskID = VHDXGUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
    static let logicalSectorSize = VHDXGUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
    static let physicalSectorSize = VHDXGUID("CDA348C7-445D-4471-9CC9-E9885251C556")
    static let parentLocator = VHDXGUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
    /// The specification's limit, 64 TiB.
    static let maxVirtualSize: UInt64 = 64 << 40

    public var blockSize: UInt64
    public var leaveBlocksAllocated: Bool
    public var hasParent: Bool
    public var virtualSize: UInt64
    public var logicalSectorSize: UInt64
    public var physicalSectorSize: UInt64
    var diskID: VHDXGUID
    /// A differencing disk's parent locator (key-value pairs).
    public var parent: VHDXParentLocator?

    public static func read(from file: ImageFile, header h: VHDXHeader) throws -> VHDXMetadata {
        let t = try file.readBytes(count: tableBytes, at: h.metadataOffset, what: "VHDX metadata table")
        guard Array(t[0..<8]) == Array("metadata".utf8) else {
            throw BlockError.invalid(file: file.path, field: "VHDX metadata table", detail: "no 'metadata' signature at \(h.metadataOffset)")
        }
        let count = Int(le16(t, 10))
        guard count <= maxEntries else {
            throw BlockError.invalid(file: file.path, field: "VHDX metadata table", detail: "\(count) entries (at most \(maxEntries))")
        }
        var items: [VHDXGUID: [UInt8]] = [:]
        for i in 0..<count {
            let e = 32 + i * 32
            let id = VHDXGUID(bytes: Array(t[e ..< e + 16]))
            let offset = UInt64(le32(t, e + 16)), length = UInt64(le32(t, e + 20)), flags = le32(t, e + 24)
            let known = [fileParameters, virtualDiskSize, virtualDiskID, logicalSectorSize, physicalSectorSize, parentLocator].contains(id)
            if !known {
                if flags & 4 != 0 { throw BlockError.unsupported(file: file.path, feature: "VHDX required metadata item \(id)") }
                continue
            }
            guard items[id] == nil else {
                throw BlockError.invalid(file: file.path, field: "VHDX metadata item \(id)", detail: "listed twice")
            }
            // Items live after the table, inside the region; the known ones are small.
            guard length == 0 || (offset >= UInt64(tableBytes) && offset <= h.metadataLength && length <= h.metadataLength - offset),
                  length <= 64 << 10 else {
                throw BlockError.invalid(file: file.path, field: "VHDX metadata item \(id)",
                                         detail: "\(length) bytes at \(offset) do not fit the \(h.metadataLength)-byte metadata region")
            }
            items[id] = length == 0 ? [] : try file.readBytes(count: Int(length), at: h.metadataOffset + offset, what: "VHDX metadata item")
        }
        func item(_ id: VHDXGUID, _ name: String, bytes: Int) throws -> [UInt8] {
            guard let b = items[id], b.count >= bytes else {
                throw BlockError.invalid(file: file.path, field: "VHDX metadata", detail: "the \(name) item is missing or too short")
            }
            return b
        }
        let params = try item(fileParameters, "file parameters", bytes: 8)
        let m = VHDXMetadata(blockSize: UInt64(le32(params, 0)), leaveBlocksAllocated: le32(params, 4) & 1 != 0,
                             hasParent: le32(params, 4) & 2 != 0,
                             virtualSize: le64(try item(virtualDiskSize, "virtual disk size", bytes: 8), 0),
                             logicalSectorSize: UInt64(le32(try item(logicalSectorSize, "logical sector size", bytes: 4), 0)),
                             physicalSectorSize: UInt64(le32(try item(physicalSectorSize, "physical sector size", bytes: 4), 0)),
                             diskID: VHDXGUID(bytes: Array((items[virtualDiskID] ?? [UInt8](repeating: 0, count: 16)).prefix(16))),
                             parent: nil)
        var withParent = m
        if m.hasParent {
            guard let item = items[parentLocator] else {
                throw BlockError.invalid(file: file.path, field: "VHDX metadata", detail: "the disk has a parent but no parent locator item")
            }
            withParent.parent = try VHDXParentLocator.parse(item, file: file.path)
        }
        guard m.blockSize >= 1 << 20, m.blockSize <= 256 << 20, m.blockSize.isPowerOfTwo else {
            throw BlockError.invalid(file: file.path, field: "VHDX block size", detail: "\(m.blockSize) (a power of two from 1 MiB to 256 MiB)")
        }
        guard m.logicalSectorSize == 512 || m.logicalSectorSize == 4096 else {
            throw BlockError.invalid(file: file.path, field: "VHDX logical sector size", detail: "\(m.logicalSectorSize) (512 or 4096)")
        }
        guard m.physicalSectorSize == 512 || m.physicalSectorSize == 4096 else {
            throw BlockError.invalid(file: file.path, field: "VHDX physical sector size", detail: "\(m.physicalSectorSize) (512 or 4096)")
        }
        guard m.virtualSize > 0, m.virtualSize <= maxVirtualSize, m.virtualSize % m.logicalSectorSize == 0 else {
            throw BlockError.invalid(file: file.path, field: "VHDX virtual disk size",
                                     detail: "\(m.virtualSize) (whole \(m.logicalSectorSize)-byte sectors, at most 64 TiB)")
        }
        return withParent
    }

    /// Payload blocks per sector-bitmap block: one bitmap block covers 2^23 sectors.
    public var chunkRatio: UInt64 { (1 << 23) * logicalSectorSize / blockSize }
    public var dataBlocks: UInt64 { (virtualSize + blockSize - 1) / blockSize }
    /// Entries in the table: the payload entries with a bitmap entry after each full group
    /// (and after the last, partial one for a differencing disk).
    public var tableEntries: UInt64 {
        hasParent ? (dataBlocks + chunkRatio - 1) / chunkRatio * (chunkRatio + 1)
                  : dataBlocks + (dataBlocks - 1) / chunkRatio
    }
}
