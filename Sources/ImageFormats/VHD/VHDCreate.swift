import BlockEngine
#if canImport(Glibc)
import Glibc
#endif

/// Creates a VHD as qemu-img 7.2 does (`-f vpc`): the size rounded up to a CHS geometry
/// (the specification's algorithm) unless `forceSize`, creator "qemu" ("qem2" when the size
/// is forced, so readers size it by the footer's current size), 2 MiB blocks. Dynamic:
/// footer copy, dynamic header at 512, table at 1536 (padded to a sector), footer. Fixed:
/// the data, then the footer.
public enum VHDCreate {
    public enum Subformat: String, CaseIterable, Sendable { case dynamic, fixed }

    /// The geometry's maximum, 65535 x 16 x 255: sized by the footer's current size then.
    static let maxGeometry = (cylinders: UInt64(65535), heads: UInt64(16), sectors: UInt64(255))
    static let blockSize: UInt64 = 2 << 20
    static let tableOffset: UInt64 = 1536
    /// Seconds from the Unix epoch to 2000-01-01, VHD's time origin.
    static let timeBase = 946_684_800

    /// The virtual size a `size`-byte request becomes, and its geometry.
    public static func layout(size: UInt64, forceSize: Bool) throws -> (bytes: UInt64, cylinders: UInt64, heads: UInt64, sectors: UInt64) {
        let g = maxGeometry
        var chs = (cylinders: UInt64(0), heads: UInt64(0), sectors: UInt64(0))
        if forceSize {
            chs = g
        } else {
            // The smallest geometry holding the size: try one more sector until it fits.
            let wanted = min(g.cylinders * g.heads * g.sectors, size / 512)
            var extra: UInt64 = 0
            while wanted > chs.cylinders * chs.heads * chs.sectors {
                chs = geometry(sectors: wanted + extra)
                extra += 1
            }
        }
        if chs == g {
            let sectors = size / 512
            guard sectors <= VHDFooter.maxSectors else {
                throw BlockError.usage("\(size) bytes is too large for VHD (at most 2040 GiB)")
            }
            return (sectors * 512, chs.cylinders, chs.heads, chs.sectors)
        }
        return (chs.cylinders * chs.heads * chs.sectors * 512, chs.cylinders, chs.heads, chs.sectors)
    }

    /// The VHD specification's CHS for a sector count (at most 16 heads; 17, 31, 63 or 255
    /// sectors per track), capped at the maximum geometry.
    static func geometry(sectors total: UInt64) -> (cylinders: UInt64, heads: UInt64, sectors: UInt64) {
        let total = min(total, maxGeometry.cylinders * maxGeometry.heads * maxGeometry.sectors)
        var spt: UInt64, heads: UInt64, cylTimesHeads: UInt64
        if total >= 65535 * 16 * 63 {
            spt = 255; heads = 16; cylTimesHeads = total / spt
        } else {
            spt = 17
            cylTimesHeads = total / spt
            heads = max(4, (cylTimesHeads + 1023) / 1024)
            if cylTimesHeads >= heads * 1024 || heads > 16 {
                spt = 31; heads = 16; cylTimesHeads = total / spt
            }
            if cylTimesHeads >= heads * 1024 {
                spt = 63; heads = 16; cylTimesHeads = total / spt
            }
        }
        return (cylTimesHeads / heads, heads, spt)
    }

    public static func create(path: String, size: UInt64, subformat: Subformat, forceSize: Bool) throws {
        let l = try layout(size: size, forceSize: forceSize)
        var footer = [UInt8](repeating: 0, count: VHDFooter.size)
        footer.replaceSubrange(0..<8, with: VHDFooter.cookie)
        put32be(&footer, 8, 2)                      // features: reserved bit, always set
        put32be(&footer, 12, 0x0001_0000)           // format version 1.0
        put64be(&footer, 16, subformat == .dynamic ? 512 : .max)
        put32be(&footer, 24, UInt32(truncatingIfNeeded: max(0, time(nil) - timeBase)))
        footer.replaceSubrange(28..<32, with: Array((forceSize ? "qem2" : "qemu").utf8))
        put32be(&footer, 32, 0x0005_0003)           // creator version (Virtual PC 2007's, as QEMU)
        footer.replaceSubrange(36..<40, with: Array("Wi2k".utf8))
        put64be(&footer, 40, l.bytes)               // original size
        put64be(&footer, 48, l.bytes)               // current size
        footer[56] = UInt8(l.cylinders >> 8); footer[57] = UInt8(truncatingIfNeeded: l.cylinders)
        footer[58] = UInt8(l.heads); footer[59] = UInt8(l.sectors)
        put32be(&footer, 60, subformat == .dynamic ? 3 : 2)
        footer.replaceSubrange(68..<84, with: randomGUID(mixedEndian: false))
        put32be(&footer, 64, VHDFooter.checksum(footer, skipping: 64))

        try ImageFile.createComplete(path: path) { file in
            switch subformat {
            case .fixed:
                try file.truncate(to: l.bytes)
                try file.write(footer, at: l.bytes)
            case .dynamic:
                let entries = (l.bytes + blockSize - 1) / blockSize
                let tableBytes = (entries * 4).alignedUp(512)
                var header = [UInt8](repeating: 0, count: Int(VHDDynamicHeader.size))
                header.replaceSubrange(0..<8, with: Array("cxsparse".utf8))
                put64be(&header, 8, .max)           // data offset: unused, all ones (what Microsoft's tools expect)
                put64be(&header, 16, tableOffset)
                put32be(&header, 24, 0x0001_0000)
                put32be(&header, 28, UInt32(entries))
                put32be(&header, 32, UInt32(blockSize))
                put32be(&header, 36, VHDFooter.checksum(header, skipping: 36))
                try file.write(footer, at: 0)
                try file.write(header, at: 512)
                try file.write([UInt8](repeating: 0xFF, count: Int(tableBytes)), at: tableOffset)
                try file.write(footer, at: tableOffset + tableBytes)
            }
        }
    }
}
