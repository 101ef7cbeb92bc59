import BlockEngine
import Glibc

/// The 512-byte header of a Bochs growing redolog, versions 1 and 2, with QEMU's limits
/// and the checks QEMU skips (header size, bitmap large enough, disk size a sector multiple).
public struct BochsHeader: Sendable {
    public static let magic = "Bochs Virtual HD Image"
    public static let redologType = "Redolog"
    public static let growingSubtype = "Growing"
    /// A redolog over a read-only base image (Bochs names it <base>.redolog).
    public static let undoableSubtype = "Undoable"
    public static let undoableSuffix = ".redolog"
    static let version1: UInt32 = 0x0001_0000, version2: UInt32 = 0x0002_0000
    static let maxCatalog: UInt32 = 0x10_0000
    static let maxExtent: UInt32 = 8 << 20
    public static let unallocated: UInt32 = 0xFFFF_FFFF

    public var type: String
    public var subtype: String
    public var version: UInt32
    public var headerSize: UInt32
    public var catalog: UInt32
    public var bitmap: UInt32
    public var extent: UInt32
    /// v2 only: FAT date << 16 | FAT time.
    public var timestamp: UInt32?
    public var diskSize: UInt64

    /// Sectors of bitmap and of data in each extent slot.
    public var bitmapSectors: UInt64 { 1 + (UInt64(bitmap) - 1) / 512 }
    public var extentSectors: UInt64 { 1 + (UInt64(extent) - 1) / 512 }
    public var slotBytes: UInt64 { 512 * (bitmapSectors + extentSectors) }
    /// Where extent slot 0 starts: after header and catalog.
    public var slotsOffset: UInt64 { UInt64(headerSize) + UInt64(catalog) * 4 }

    static func string(_ b: [UInt8], _ range: Range<Int>) -> String {
        String(decoding: b[range].prefix { $0 != 0 }, as: UTF8.self)
    }

    /// Sectors not in an undoable redolog come from its base image; in a growing image they are zeros.
    public var isUndoable: Bool { subtype == Self.undoableSubtype }

    public static func probe(_ b: [UInt8]) -> Bool {
        b.count >= 64 && string(b, 0..<32) == magic && string(b, 32..<48) == redologType
    }

    public static func read(from file: ImageFile) throws -> BochsHeader {
        let path = file.path
        let size = try file.size()
        guard size >= 512 else { throw BlockError.truncated(file: path, what: "Bochs header", offset: 0, needed: 512, fileSize: size) }
        let b = try file.readBytes(count: 512, at: 0, what: "Bochs header")
        func bad(_ field: String, _ detail: String) -> BlockError { .invalid(file: path, field: field, detail: detail) }
        guard string(b, 0..<32) == magic, string(b, 32..<48) == redologType else { throw bad("Bochs magic", "not a Bochs redolog image") }
        let subtype = string(b, 48..<64)
        guard subtype == growingSubtype || subtype == undoableSubtype else {
            throw BlockError.unsupported(file: path, feature: "Bochs '\(subtype)' redolog (growing images and undoable redologs are read; a volatile log is a temporary file of a running Bochs)")
        }
        let version = le32(b, 64)
        guard version == version1 || version == version2 else { throw bad("Bochs version", "0x\(String(version, radix: 16)) (expected 1.0 or 2.0)") }
        let h = BochsHeader(type: redologType, subtype: subtype, version: version, headerSize: le32(b, 68),
                            catalog: le32(b, 72), bitmap: le32(b, 76), extent: le32(b, 80),
                            timestamp: version == version2 ? le32(b, 84) : nil,
                            diskSize: version == version2 ? le64(b, 88) : le64(b, 84))
        guard h.headerSize == 512 else { throw bad("header size", "\(h.headerSize) (must be 512)") }
        guard h.catalog <= maxCatalog else { throw bad("catalog", "\(h.catalog) entries is too large (limit \(maxCatalog))") }
        let ext = UInt64(h.extent)
        guard ext >= 512, ext <= UInt64(maxExtent), ext.isPowerOfTwo else {
            throw bad("extent size", "\(h.extent) is not a power of two in 512 B...8 MiB")
        }
        guard h.bitmap > 0, UInt64(h.bitmap) * 8 >= ext / 512, h.bitmap <= 64 << 10 else {
            throw bad("bitmap size", "\(h.bitmap) bytes does not fit \(ext / 512) sectors per extent")
        }
        try VirtualSize.checked(h.diskSize, file: path, field: "Bochs disk size")
        let needed = (h.diskSize / 512 + ext / 512 - 1) / (ext / 512)
        guard UInt64(h.catalog) >= needed else { throw bad("catalog", "\(h.catalog) entries are too few for a \(h.diskSize)-byte disk") }
        guard h.slotsOffset <= size else {
            throw BlockError.truncated(file: path, what: "Bochs catalog", offset: 512, needed: UInt64(h.catalog) * 4, fileSize: size)
        }
        return h
    }

    /// The v2 timestamp as "YYYY-MM-DD hh:mm:ss" (FAT encoding).
    public var timestampText: String? { timestamp.map(Self.fatText) }

    /// A file time as Bochs stamps it: FAT date << 16 | FAT time, in local time.
    public static func fatTimestamp(_ seconds: Int) -> UInt32 {
        var t = time_t(seconds)
        var parts = tm()
        localtime_r(&t, &parts)
        let date = UInt32(max(0, parts.tm_year - 80)) << 9 | UInt32(parts.tm_mon + 1) << 5 | UInt32(parts.tm_mday)
        let time = UInt32(parts.tm_hour) << 11 | UInt32(parts.tm_min) << 5 | UInt32(parts.tm_sec / 2)
        return date << 16 | time
    }

    /// A FAT date << 16 | time as "YYYY-MM-DD hh:mm:ss".
    public static func fatText(_ t: UInt32) -> String {
        let date = t >> 16, time = t & 0xFFFF
        let y = 1980 + (date >> 9), mo = (date >> 5) & 15, d = date & 31
        let hh = time >> 11, mm = (time >> 5) & 63, ss = (time & 31) * 2
        func two(_ v: UInt32) -> String { v < 10 ? "0\(v)" : "\(v)" }
        return "\(y)-\(two(mo))-\(two(d)) \(two(hh)):\(two(mm)):\(two(ss))"
    }
}
