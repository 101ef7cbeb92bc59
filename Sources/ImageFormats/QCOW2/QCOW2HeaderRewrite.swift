import BlockEngine

/// Rewrites the header cluster's extension area, as QEMU's header update does: the fixed
/// header is kept, the extensions follow in their order with the bitmaps extension set,
/// replaced or dropped, then the end marker and the backing file name (whose offset moves
/// when the area grows or shrinks). Only the bytes that differ are written, in one write, so
/// a count or offset change in place is a single-sector update.
extension QCOW2Header {
    static let bitmapsExtension: UInt32 = 0x2385_2875

    static let backingFormatExtension: UInt32 = 0xE279_2ACA

    /// The header with the bitmaps extension describing `directory` (nil: no bitmaps, and
    /// autoclear bit 0 cleared with it), written and made durable.
    func rewritingBitmaps(_ file: ImageFile, directory: (count: UInt32, size: UInt64, offset: UInt64)?) throws -> QCOW2Header {
        guard version == 3 else {
            throw BlockError.unsupported(file: file.path, feature: "dirty bitmaps in a qcow2 version 2 (compat 0.10) image: they need version 3")
        }
        return try rewriting(file, bitmaps: .some(directory), backing: nil)
    }

    /// The header naming `name` as its backing file (nil or empty: none), with `format` in
    /// the backing format extension (nil: the extension dropped, the backing probed), written
    /// and made durable (`rebase`; the data it needs must be durable first).
    public func rewritingBacking(_ file: ImageFile, name: String?, format: String?) throws -> QCOW2Header {
        try rewriting(file, bitmaps: nil, backing: .some((name.flatMap { $0.isEmpty ? nil : $0 }, format)))
    }

    /// The shared rewrite: `bitmaps` nil keeps the bitmaps extension; `backing` nil keeps the
    /// backing file name and format.
    private func rewriting(_ file: ImageFile, bitmaps: (count: UInt32, size: UInt64, offset: UInt64)??,
                           backing: (name: String?, format: String?)?) throws -> QCOW2Header {
        func bad(_ detail: String) -> BlockError { .invalid(file: file.path, field: "qcow2 header extensions", detail: detail) }
        let cs = Int(clusterSize)
        let old = try file.readBytes(count: Int(min(UInt64(cs), try file.size())), at: 0, what: "qcow2 header cluster")
        // Checked when the header was read; checked again (before any use), since this reads it afresh.
        let rawOffset = be64(old, 8), rawSize = UInt64(be32(old, 16)), count = UInt64(old.count)
        guard UInt64(headerLength) <= count, rawOffset <= count, rawSize <= count - rawOffset else {
            throw bad("the backing file name at \(rawOffset) (\(rawSize) bytes) no longer fits the header cluster")
        }
        let backingOffset = Int(rawOffset), backingSize = Int(rawSize)
        let areaEnd = backingOffset != 0 ? backingOffset : old.count
        var extensions: [(type: UInt32, data: ArraySlice<UInt8>)] = []
        var at = Int(headerLength)
        while at + 8 <= areaEnd {
            let type = be32(old, at), length = Int(be32(old, at + 4))
            if type == 0 { break }
            guard length <= areaEnd - at - 8 else { throw bad("extension 0x\(String(type, radix: 16)) runs past the area's end") }
            extensions.append((type, old[(at + 8) ..< (at + 8 + length)]))
            at += 8 + (length + 7) / 8 * 8
        }
        if let directory = bitmaps {
            var data: [UInt8]? = nil
            if let d = directory {
                var b = [UInt8](repeating: 0, count: 24)
                put32be(&b, 0, d.count); put64be(&b, 8, d.size); put64be(&b, 16, d.offset)
                data = b
            }
            if let i = extensions.firstIndex(where: { $0.type == Self.bitmapsExtension }) {
                if let data { extensions[i].data = data[...] } else { extensions.remove(at: i) }
            } else if let data {
                // QEMU's order puts it after the feature name table; unknown ones keep their place.
                let after = extensions.lastIndex { $0.type == 0xE279_2ACA || $0.type == 0x6803_F857 || $0.type == 0x0537_BE77 || $0.type == 0x4441_5441 }
                extensions.insert((Self.bitmapsExtension, data[...]), at: after.map { $0 + 1 } ?? 0)
            }
        }
        if let backing {
            // The backing format extension comes first, as QEMU writes it.
            extensions.removeAll { $0.type == Self.backingFormatExtension }
            if backing.name != nil, let format = backing.format { extensions.insert((Self.backingFormatExtension, Array(format.utf8)[...]), at: 0) }
        }
        var new = Array(old[0 ..< Int(headerLength)])
        for e in extensions {
            var head = [UInt8](repeating: 0, count: 8)
            put32be(&head, 0, e.type); put32be(&head, 4, UInt32(e.data.count))
            new += head + e.data + [UInt8](repeating: 0, count: (8 - e.data.count % 8) % 8)
        }
        new += [UInt8](repeating: 0, count: 8)
        let name: [UInt8]? = backing.map { $0.name.map { Array($0.utf8) } } ?? (backingOffset != 0 ? Array(old[backingOffset ..< backingOffset + backingSize]) : nil)
        var field = [UInt8](repeating: 0, count: 12)  // offset (8) and size (4) of the name
        if let name {
            guard name.count <= 1023 else { throw bad("a backing file name of \(name.count) bytes (QEMU takes at most 1023)") }
            put64be(&field, 0, UInt64(new.count)); put32be(&field, 8, UInt32(name.count))
            new += name
        }
        new.replaceSubrange(8 ..< 20, with: field)
        guard new.count <= cs else { throw bad("the header, its extensions and the backing name no longer fit the \(cs)-byte header cluster") }
        var h = self
        if let directory = bitmaps {
            h.autoclear = directory == nil ? autoclear & ~Self.autoclearBitmaps : autoclear | Self.autoclearBitmaps
            var ac = [UInt8](repeating: 0, count: 8)
            put64be(&ac, 0, h.autoclear)
            new.replaceSubrange(Field.autoclear ..< Field.autoclear + 8, with: ac)
        }
        // Bytes past the old content count as differing from zero.
        let padded = old + [UInt8](repeating: 0, count: max(0, new.count - old.count))
        if let first = new.indices.first(where: { new[$0] != padded[$0] }),
           let last = new.indices.last(where: { new[$0] != padded[$0] }) {
            try file.write(Array(new[first ... last]), at: UInt64(first))
            try file.sync()
        }
        if let directory = bitmaps {
            h.hasBitmaps = directory != nil
            h.bitmapCount = directory?.count ?? 0
            h.bitmapDirectorySize = directory?.size ?? 0
            h.bitmapDirectoryOffset = directory?.offset ?? 0
        }
        if let backing {
            h.backingName = backing.name
            h.backingFormat = backing.name == nil ? nil : backing.format
        }
        return h
    }
}
