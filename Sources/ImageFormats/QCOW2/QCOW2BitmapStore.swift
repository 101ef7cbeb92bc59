import BlockEngine
#if canImport(Glibc)
import Glibc
#endif

/// Opening and storing persistent dirty bitmaps, in QEMU's order.
/// - Writable open: an extension whose autoclear bit 0 is clear was left stale by a writer
///   without bitmap support and is dropped (its clusters reclaimed as leaks); otherwise the
///   directory must pass QEMU's checks, consistent bitmaps are loaded, and every bitmap is
///   flagged in use durably before the first guest write.
/// - Close: each consistent bitmap goes to new clusters (clusters without a dirty bit get
///   entry 0), then a new table and directory; all durable before the header names the new
///   directory (which clears in_use); only then are the old clusters freed.
extension QCOW2Driver {
    static func openBitmaps(_ file: ImageFile, _ header: QCOW2Header, onNote: ((String) -> Void)?) throws -> (QCOW2Header, QCOW2BitmapSet?) {
        var h = header
        guard h.version == 3 else { return (h, nil) }
        guard h.hasBitmaps else { return (h, QCOW2BitmapSet(entries: [], header: h, path: file.path)) }
        if h.autoclear & QCOW2Header.autoclearBitmaps == 0 {
            // A program without bitmap support wrote the image: every bitmap is stale.
            h = try h.rewritingBitmaps(file, directory: nil)
            var note = "its \(header.bitmapCount) persistent dirty bitmap(s) were stale (autoclear bit 0 clear: a program without bitmap support wrote the image), so the bitmaps extension was dropped, as QEMU drops it"
            let check = try QCOW2Check.run(file: file, header: h, repair: false)
            if check.corruptions == 0 && check.leakedClusters > 0 {
                let fixed = try QCOW2Check.run(file: file, header: h, repair: true)
                note += "; \(check.leakedClusters) cluster(s) no longer referenced were freed (\(fixed.repairedRefcounts) refcounts set)"
            }
            onNote?(note)
            return (h, QCOW2BitmapSet(entries: [], header: h, path: file.path))
        }
        let fileSize = try file.size()
        let (list, dir): ([QCOW2Bitmap], [UInt8])
        do { (list, dir) = try QCOW2Bitmaps.readDirectory(file, header: h, fileSize: fileSize) } catch let e as BlockError {
            throw BlockError.usage("\(e.description); QEMU would not open it for writing either; mount it --read-only, or remove the bitmaps with qemu-img")
        }
        var entries: [QCOW2BitmapSet.Entry] = []
        var inconsistent: [String] = []
        for b in list {
            if b.inUse {
                inconsistent.append(b.name)
                entries.append(.init(bitmap: b, bits: nil, clusters: heldClusters(b, file: file, header: h, fileSize: fileSize)))
                continue
            }
            let loaded: (bits: DirtyBitmap, clusters: [HostRange])
            do { loaded = try QCOW2Bitmaps.load(b, file: file, header: h, fileSize: fileSize) } catch let e as BlockError {
                throw BlockError.usage("\(e.description); QEMU would not open it for writing either; mount it --read-only")
            }
            entries.append(.init(bitmap: b, bits: loaded.bits, clusters: loaded.clusters))
        }
        try QCOW2Bitmaps.markInUse(file, header: h, bitmaps: list, directory: dir)
        if !inconsistent.isEmpty {
            onNote?("bitmap(s) \(inconsistent.map { "'\($0)'" }.joined(separator: ", ")) were in use when the image was opened (a writer did not close them) and are inconsistent: not recorded into or shown; `rawmount bitmap remove` drops them")
        }
        return (h, QCOW2BitmapSet(entries: entries, header: h, path: file.path))
    }

    /// The clusters an inconsistent bitmap's table names (only well-formed entries inside
    /// the file), so removing it frees them as QEMU does.
    static func heldClusters(_ b: QCOW2Bitmap, file: ImageFile, header h: QCOW2Header, fileSize: UInt64) -> [HostRange] {
        let cs = h.clusterSize
        var data: [HostRange] = []
        guard let table = try? QCOW2Bitmaps.forEachTableEntry(b, file: file, header: h, fileSize: fileSize, { _, e in
            let c = e & QCOW2Bitmaps.tableOffsetMask
            if c != 0, e & QCOW2Bitmaps.tableReserved == 0, c % cs == 0, c < fileSize { data.append(HostRange(offset: c, length: cs)) }
        }) else { return [] }
        return [table] + data
    }

    /// Writes the bitmap set as described above; a no-op for images that never held bitmaps.
    func storeBitmaps() throws {
        guard let set = bitmaps, let refcounts, set.needsStore else { return }
        let cs = header.clusterSize
        func write(_ bytes: [UInt8], clusters n: UInt64) throws -> UInt64 {
            let at = try refcounts.allocateRun(n)
            try file.write(bytes + [UInt8](repeating: 0, count: Int(n * cs) - bytes.count), at: at)
            return at
        }
        let (entries, dropped, oldDirectory) = set.state.withLock { ($0.entries, $0.dropped, $0.directory) }
        var stored: [QCOW2Bitmap] = [], storedClusters: [[HostRange]] = []
        var toFree = dropped
        for e in entries {
            guard let bits = e.bits else {  // inconsistent: carried over untouched, still in use
                stored.append(e.bitmap); storedClusters.append(e.clusters)
                continue
            }
            let count = QCOW2Bitmaps.tableEntries(diskSize: bits.diskSize, granularity: bits.granularity, clusterSize: cs)
            var table = [UInt8](repeating: 0, count: Int(count * 8))
            var clusters: [HostRange] = []
            for i in 0 ..< count {
                guard let words = bits.words(from: i * cs * 8, count: cs * 8) else { continue }
                // A cluster of ones is table entry 1, no cluster (the format's all-ones value):
                // a bitmap dirty everywhere costs its table only.
                if words.allSatisfy({ $0 == ~0 }) { put64be(&table, Int(i) * 8, 1); continue }
                var bytes = [UInt8](repeating: 0, count: Int(cs))
                for (k, w) in words.enumerated() where w != 0 { put64(&bytes, k * 8, w) }
                let at = try write(bytes, clusters: 1)
                put64be(&table, Int(i) * 8, at)
                clusters.append(HostRange(offset: at, length: cs))
            }
            let tableClusters = (count * 8 + cs - 1) / cs
            let tableAt = try write(table, clusters: tableClusters)
            clusters.insert(HostRange(offset: tableAt, length: tableClusters * cs), at: 0)
            var b = e.bitmap
            b.tableOffset = tableAt
            b.tableEntries = UInt32(count)
            b.flags &= ~QCOW2Bitmaps.flagInUse
            stored.append(b); storedClusters.append(clusters)
            toFree += e.clusters
        }
        var directory: (count: UInt32, size: UInt64, offset: UInt64)? = nil
        if !stored.isEmpty {
            let dir = QCOW2Bitmaps.serializeDirectory(stored)
            let n = (UInt64(dir.count) + cs - 1) / cs
            directory = (UInt32(stored.count), UInt64(dir.count), try write(dir, clusters: n))
        }
        // Everything the new directory names, and the refcounts that own it, before the header.
        try refcounts.writeDirty()
        try file.sync()
        if Self.testPause > 0 { usleep(Self.testPause) }  // tests: new bitmaps durable, header not yet
        _ = try header.rewritingBitmaps(file, directory: directory)
        if let d = oldDirectory { toFree.append(HostRange(offset: d.offset, length: (d.size + cs - 1) / cs * cs)) }
        set.state.withLock { s in
            for i in s.entries.indices { s.entries[i].bitmap = stored[i]; s.entries[i].clusters = storedClusters[i] }
            s.dropped = []
            s.directory = directory.map { ($0.offset, $0.size) }
            s.hadBitmaps = directory != nil
        }
        try release(toFree)
        try refcounts.writeDirty()
        try file.sync()
    }
}

extension QCOW2Driver {
    /// Consistent bitmaps, for the `.dirty-` views: the live ones of a writable open, or
    /// (read-only) those loaded from disk on first use. A bitmap QEMU would refuse, or any
    /// bitmap of a stale extension, is left out.
    public var dirtyBitmaps: [(name: String, bits: DirtyBitmap)] {
        if let bitmaps {
            return bitmaps.entries.compactMap { e in e.bits.map { (e.bitmap.name, $0) } }
        }
        return loadedBitmaps.withLock { cached in
            if let cached { return cached }
            var out: [(name: String, bits: DirtyBitmap)] = []
            if snapshot == nil, header.hasBitmaps, header.autoclear & QCOW2Header.autoclearBitmaps != 0,
               let size = try? file.size(), let list = try? QCOW2Bitmaps.readDirectory(file, header: header, fileSize: size).bitmaps {
                for b in list where !b.inUse {
                    if let loaded = try? QCOW2Bitmaps.load(b, file: file, header: header, fileSize: size) { out.append((b.name, loaded.bits)) }
                }
            }
            cached = out
            return out
        }
    }
}
