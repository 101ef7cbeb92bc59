import BlockEngine

/// Creates empty VMDK images laid out as qemu-img does.
public enum VMDKCreate {
    public enum Subformat: String, CaseIterable, Sendable {
        case monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat, streamOptimized
    }
    static let grainSectors: UInt64 = 128
    static let maxExtentSectors: UInt64 = 4_194_304 // 2 GiB

    /// `backing` is stored as parentFileNameHint (relative to the new image); the parent must
    /// be a VMDK so its CID can be recorded.
    public static func create(path: String, size: UInt64, subformat: Subformat, backing: String? = nil,
                              parentCID: UInt32? = nil) throws {
        let sectors = size.alignedUp(512) / 512
        guard sectors > 0 else { throw BlockError.usage("\(path): size must be at least 512 bytes") }
        let base = PathName.baseName(path)
        let stem = base.hasSuffix(".vmdk") ? String(base.dropLast(5)) : base
        let dir = PathName.directory(of: path) + "/"
        var extentLines: [String] = []
        switch subformat {
        case .monolithicSparse, .streamOptimized:
            extentLines = ["RW \(sectors) SPARSE \"\(base)\""]
            let desc = descriptor(subformat, extentLines, backing, parentCID, sectors)
            try writeSparse(path: path, sectors: sectors, descriptor: desc, stream: subformat == .streamOptimized)
            return
        case .monolithicFlat:
            let name = "\(stem)-flat.vmdk"
            try ImageFile.createNew(path: dir + name).truncate(to: sectors * 512)
            extentLines = ["RW \(sectors) FLAT \"\(name)\" 0"]
        case .twoGbMaxExtentSparse, .twoGbMaxExtentFlat:
            var left = sectors, n = 1
            while left > 0 {
                let part = min(left, maxExtentSectors)
                let sparse = subformat == .twoGbMaxExtentSparse
                let name = "\(stem)-\(sparse ? "s" : "f")\(n < 10 ? "00" : n < 100 ? "0" : "")\(n).vmdk"
                if sparse {
                    try writeSparse(path: dir + name, sectors: part, descriptor: nil, stream: false)
                    extentLines.append("RW \(part) SPARSE \"\(name)\"")
                } else {
                    try ImageFile.createNew(path: dir + name).truncate(to: part * 512)
                    extentLines.append("RW \(part) FLAT \"\(name)\" 0")
                }
                left -= part; n += 1
            }
        }
        // The descriptor last, whole: until it exists the extents are only files nothing names.
        try ImageFile.createComplete(path: path) { file in
            try file.write(Array(descriptor(subformat, extentLines, backing, parentCID, sectors).utf8), at: 0)
        }
    }

    static func descriptor(_ sub: Subformat, _ extents: [String], _ backing: String?, _ parentCID: UInt32?, _ sectors: UInt64) -> String {
        func hex(_ v: UInt32) -> String { let h = String(v, radix: 16); return String(repeating: "0", count: 8 - h.count) + h }
        var t = "# Disk DescriptorFile\nversion=1\nCID=\(hex(UInt32.random(in: 1...UInt32.max - 1)))\n"
        t += "parentCID=\(parentCID.map(hex) ?? "ffffffff")\ncreateType=\"\(sub.rawValue)\"\n"
        if let backing { t += "parentFileNameHint=\"\(backing)\"\n" }
        t += "\n# Extent description\n" + extents.joined(separator: "\n") + "\n\n# The Disk Data Base\n#DDB\n\n"
        t += "ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"\(min(sectors / (16 * 63), 16383))\"\n"
        t += "ddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\n"
        return t
    }

    /// KDMV layout: header, descriptor (20 sectors when embedded), redundant GD + GTs, GD + GTs,
    /// grains from overHead. All tables are preallocated and the directories filled.
    static func writeSparse(path: String, sectors: UInt64, descriptor: String?, stream: Bool) throws {
        let grain = grainSectors
        let grains = (sectors + grain - 1) / grain
        let gtCount = (grains + 511) / 512
        let gtSectors: UInt64 = 4
        let gdSectors = (gtCount * 4 + 511) / 512
        let descOffset: UInt64 = descriptor == nil ? 0 : 1, descSize: UInt64 = descriptor == nil ? 0 : 20
        let rgd = 1 + descSize
        let gd = rgd + gdSectors + gtCount * gtSectors
        let overHead = (gd + gdSectors + gtCount * gtSectors).alignedUp(grain)
        var h = [UInt8](repeating: 0, count: 512)
        put32(&h, 0, VMDKSparseHeader.magic)
        put32(&h, 4, stream ? 3 : 1)
        put32(&h, 8, stream ? 0x30003 : 0x3)
        put64(&h, 12, sectors); put64(&h, 20, grain)
        put64(&h, 28, descOffset); put64(&h, 36, descSize)
        put32(&h, 44, 512)
        put64(&h, 48, rgd); put64(&h, 56, gd); put64(&h, 64, overHead)
        h[73] = 0x0A; h[74] = 0x20; h[75] = 0x0D; h[76] = 0x0A
        if stream { h[77] = 1 }
        // Under a temporary name until whole: a header with directories still zero would pass
        // for a valid image (qemu-img reads it) whose writes then fail.
        try ImageFile.createComplete(path: path) { file in
            try file.truncate(to: overHead * 512)
            try file.write(h, at: 0)
            if let descriptor {
                let bytes = Array(descriptor.utf8)
                guard bytes.count <= Int(descSize * 512) else { throw BlockError.usage("\(path): descriptor too long") }
                try file.write(bytes, at: 512)
            }
            for (dirSector, firstGT) in [(rgd, rgd + gdSectors), (gd, gd + gdSectors)] {
                var dir = [UInt8](repeating: 0, count: Int(gdSectors * 512))
                for i in 0..<Int(gtCount) { put32(&dir, i * 4, UInt32(firstGT + UInt64(i) * gtSectors)) }
                try file.write(dir, at: dirSector * 512)
            }
        }
    }
}
