import BlockEngine
import Synchronization

/// One hosted sparse (KDMV) extent: grain directory -> grain tables -> grains, through the
/// shared table cache. Host offsets it returns are offsets in its own file.
final class VMDKSparseExtent: Sendable {
    let file: ImageFile
    let header: VMDKSparseHeader
    let directory: TableCache   // GD and redundant GD, in 512-byte chunks (never past their region)
    let tables: TableCache      // grain tables (GT and redundant GT), one table per entry
    let writeBackChain: WriteBackChain
    let allocator: Allocator
    /// Header area (overHead), descriptor, both grain directories and every grain table: no
    /// grain may point into them (a grain at sector 1 would let a guest write rewrite the
    /// embedded descriptor).
    let metadata: MetadataRanges
    static let gdChunk = 512
    /// Most empty directory entries one `map` call passes.
    static let emptyRunEntries: UInt64 = 1 << 16
    /// Recently inflated grains (streamOptimized), so small reads do not inflate a grain again.
    private let inflated: InflatedClusters

    /// `size`: the file's, when the caller has it (a split image opens thousands of extents).
    init(file: ImageFile, size known: UInt64? = nil) throws {
        let size = try known ?? file.size()
        let h = try VMDKSparseHeader.read(from: file, size: size)
        self.file = file
        header = h
        let t = TableCache(file: file, tableBytes: h.gtBytes, encoding: .u32LE, capacity: max(64, (8 << 20) / h.gtBytes),
                           beforeWriteBack: { [file] in try file.sync() })
        tables = t
        directory = TableCache(file: file, tableBytes: Self.gdChunk, encoding: .u32LE, capacity: 1024)
        // Grain tables after the grains they name; a directory entry only after the grain
        // table it points to.
        writeBackChain = WriteBackChain([.init(t, afterData: true), .init(directory)], barrier: { [file] in try file.sync() })
        allocator = Allocator(file: file.path, nextOffset: size, alignment: 512, limit: UInt64(UInt32.max) * 512,
                              preallocating: file)
        // Only compressed grains are ever inflated: other extents (thousands in a split
        // image) keep the smallest cache.
        inflated = InflatedClusters(clusterBytes: Int(h.grainBytes), budget: h.isCompressed ? 8 << 20 : 0)
        // Small directories are read whole, once, and go into the cache as they are: the first
        // count or walk would otherwise read each chunk again (a split image has thousands).
        var directories: [UInt64: [UInt8]] = [:]
        let chunk = UInt64(Self.gdChunk)
        for gd in [h.gdOffset] + (h.hasRedundantGD ? [h.rgdOffset] : []) where gd != 0 && gd != VMDKSparseHeader.gdAtEnd {
            let start = gd * 512, bytes = (h.gdEntries * 4).alignedUp(chunk)
            guard bytes <= Self.wholeDirectoryBytes, start <= size, bytes <= size - start else { continue }
            // QEMU and VMware put the first grain table right after the directory, sharing
            // its host block, so it is never a hole the count could pass: read with it.
            let firstTable = UInt64(h.gtBytes), end = start + bytes
            let withTable = gd == h.gdOffset && firstTable <= size - end
            let read = try file.readBytes(count: Int(bytes + (withTable ? firstTable : 0)), at: start, what: "VMDK grain directory")
            let all = Array(read[..<Int(bytes)])
            directories[gd] = all
            for k in 0 ..< Int(bytes / chunk) {
                directory.seed(table: start + UInt64(k) * chunk, bytes: Array(all[k * Self.gdChunk ..< (k + 1) * Self.gdChunk]))
            }
            if withTable, TableView(bytes: all, encoding: .u32LE)[0] * 512 == end {
                t.seed(table: end, bytes: Array(read[Int(bytes)...]))
            }
        }
        metadata = try Self.metadataRanges(file: file, header: h, size: size, read: directories)
    }

    /// Directories up to this size are read whole at open (a 2 GiB split extent's is 256 bytes).
    static let wholeDirectoryBytes: UInt64 = 64 << 10

    /// Reads both directories once (bounded by their size, 32 Mi entries at most), except
    /// those the caller read already (`read`, by sector).
    static func metadataRanges(file: ImageFile, header h: VMDKSparseHeader, size: UInt64, read: [UInt64: [UInt8]] = [:]) throws -> MetadataRanges {
        var ranges = [MetadataRanges.Range(start: 0, length: h.overHead * 512, what: "the header area")]
        if h.descriptorOffset != 0 {
            ranges.append(.init(start: h.descriptorOffset * 512, length: h.descriptorSize * 512, what: "the descriptor"))
        }
        var tables: [UInt64] = []
        tables.reserveCapacity(Int(min(h.gdEntries, 1 << 16)) * (h.hasRedundantGD ? 2 : 1))
        for gd in [h.gdOffset] + (h.hasRedundantGD ? [h.rgdOffset] : []) where gd != 0 && gd != VMDKSparseHeader.gdAtEnd {
            ranges.append(.init(start: gd * 512, length: h.gdEntries * 4, what: "a grain directory"))
            if let bytes = read[gd] {
                let view = TableView(bytes: bytes, encoding: .u32LE)
                for i in 0 ..< Int(h.gdEntries) where view[i] != 0 { tables.append(view[i] * 512) }
                try MetadataRanges.checkCount(tables.count, file: file.path)
                continue
            }
            try FlatTable.forEachEntry(file, start: gd * 512, count: h.gdEntries, encoding: .u32LE, fileSize: size,
                                       what: "VMDK grain directory") { _, gt in
                if gt != 0 { tables.append(gt * 512) }
                try MetadataRanges.checkCount(tables.count, file: file.path)
            }
        }
        // Tables laid out back to back (QEMU preallocates all of them: 262144 on an 8 TiB
        // disk) are recorded as one range, so the list stays small.
        // Usually in order already (each directory's tables follow it): a split image has
        // thousands of extents to open.
        if zip(tables, tables.dropFirst()).contains(where: { $0 > $1 }) { tables.sort() }
        let gtBytes = UInt64(h.gtBytes)
        var k = 0
        while k < tables.count {
            let start = tables[k]
            var end = start + gtBytes
            k += 1
            while k < tables.count && tables[k] <= end { end = max(end, tables[k] + gtBytes); k += 1 }
            ranges.append(.init(start: start, length: end - start, what: "a grain table"))
        }
        return try MetadataRanges(ranges, file: file.path)
    }

    /// At least the first `need` inflated bytes of the compressed grain at `sector` (marker +
    /// zlib stream, or a bare zlib stream without markers).
    func grain(atSector sector: UInt64, need: Int) throws -> [UInt8] {
        try inflated.cluster(at: sector, need: need) { try inflateGrain(atSector: sector, limit: $0) }
    }

    private func inflateGrain(atSector sector: UInt64, limit: Int) throws -> [UInt8] {
        let grainBytes = Int(header.grainBytes)
        let at = sector * 512
        var dataAt = at, size: UInt64
        if header.hasMarkers {
            let marker = try file.readBytes(count: 12, at: at, what: "compressed grain marker")
            size = UInt64(le32(marker, 8))
            dataAt += 12
            guard size > 0, size <= 2 * UInt64(grainBytes) else {
                throw BlockError.invalid(file: file.path, field: "grain marker at sector \(sector)", detail: "compressed size \(size)")
            }
        } else {
            size = min(2 * UInt64(grainBytes), allocator.end - at)
        }
        let stored = try Decompress.stored(file, count: Int(size), at: dataAt)
        return try Decompress.first(limit, of: stored, as: .zlib, whole: grainBytes, file: file.path,
                                    what: "compressed grain at sector \(sector)")
    }

    var length: UInt64 { header.capacity * 512 }

    private func directoryEntry(_ gdSector: UInt64, _ i: UInt64) throws -> UInt64 {
        let per = UInt64(Self.gdChunk / 4)
        let chunk = gdSector * 512 + (i / per) * UInt64(Self.gdChunk)
        // A walk goes on through the directory: the chunks ahead in one read (a short file
        // is reported by the plain read below).
        try? directory.readAhead(from: chunk, upTo: gdSector * 512 + (header.gdEntries * 4).alignedUp(UInt64(Self.gdChunk)), count: 64)
        return try directory.entry(table: chunk, index: Int(i % per))
    }

    private func setDirectoryEntry(_ gdSector: UInt64, _ i: UInt64, _ v: UInt64) throws {
        let per = UInt64(Self.gdChunk / 4)
        try directory.setEntry(table: gdSector * 512 + (i / per) * UInt64(Self.gdChunk), index: Int(i % per), value: v)
    }

    /// A grain table that lies in a hole of the host file and is not in the cache is all
    /// zeros: QEMU preallocates every table of a new image, so an 8 TiB disk has 262144 of
    /// them, and reading each would make one status walk read 512 MiB of zeros.
    func neverWritten(_ gt: UInt64) -> Bool {
        !tables.isCached(table: gt) && file.isHole(gt, length: UInt64(header.gtBytes))
    }

    /// A host hole holding `gt` in which the cache holds no table: every table inside it is
    /// empty, so a walk needs no further look at them.
    private func emptyWindow(_ gt: UInt64) -> (start: UInt64, end: UInt64)? {
        guard gt != 0, let h = file.hole(around: gt, length: UInt64(header.gtBytes)), !tables.holdsAny(from: h.start, to: h.end) else { return nil }
        return h
    }

    /// How many directory entries from `i` (below `stop`, within one directory chunk) name
    /// no table or an empty one; entries are taken a chunk at a time.
    private func emptyEntries(from i: UInt64, upTo stop: UInt64, window: inout (start: UInt64, end: UInt64)?) -> UInt64 {
        let per = UInt64(Self.gdChunk / 4)
        guard (try? directoryEntry(header.gdOffset, i)) != nil,  // reads (and reads ahead of) the chunk
              let entries = try? directory.withEntries(table: header.gdOffset * 512 + (i / per) * UInt64(Self.gdChunk), {
                  view in (Int(i % per) ..< view.count).map { view[$0] } }) else { return 0 }
        let gtBytes = UInt64(header.gtBytes)
        var n: UInt64 = 0
        for e in entries where i + n < stop {
            let t = e * 512
            if t != 0, !(window.map { t >= $0.start && gtBytes <= $0.end - min(t, $0.end) } ?? false) {
                // Outside the window: checked one by one (inside the file, a hole, not held).
                guard (try? grainTable(i + n)) == t, neverWritten(t) else { break }
                window = emptyWindow(t)
            }
            n += 1
        }
        return n
    }

    /// The grain table for directory index `i` (0 if none), checked to lie inside the file.
    func grainTable(_ i: UInt64, redundant: Bool = false) throws -> UInt64 {
        let gt = try directoryEntry(redundant ? header.rgdOffset : header.gdOffset, i)
        guard gt != 0 else { return 0 }
        guard gt * 512 + UInt64(header.gtBytes) <= file.end(cached: allocator.end) else {
            throw BlockError.invalid(file: file.path, field: "grain directory entry \(i)",
                                     detail: "grain table at sector \(gt) is past the end of the file")
        }
        return gt * 512
    }

    func map(_ rel: UInt64, maxLength: UInt64) throws -> Mapping {
        let cover = header.gtCoverage, grain = header.grainBytes
        let gdi = rel / cover
        let spanEnd = min(rel + maxLength, (gdi + 1) * cover)
        let gt = try grainTable(gdi)
        // Only a walk longer than one table asks the host about holes: a guest read or write
        // reads the table (as cheap as the lseek) and keeps it cached.
        if gt == 0 || maxLength > cover && neverWritten(gt) {
            // A long walk (status, SEEK_DATA) passes a run of empty directory entries (or of
            // preallocated tables never written) in one step: a huge, mostly empty disk costs
            // its directory, not one call per entry.
            var next = gdi + 1, end = spanEnd
            let limit = min(rel + maxLength, length)
            var window = emptyWindow(gt)
            let stop = min(gdi + Self.emptyRunEntries, (limit + cover - 1) / cover)
            while end < limit, next < stop {
                let n = emptyEntries(from: next, upTo: stop, window: &window)
                if n == 0 { break }
                next += n
                end = min(limit, next * cover)
            }
            return .unallocated(length: end - rel)
        }
        // The frontier is read before the entries; a grain committed meanwhile was allocated
        // after that read, so an entry past it is checked again against a fresh frontier.
        var end = allocator.end
        return try tables.mapRun(from: rel, to: spanEnd, unit: grain, locate: { pos in
            (gt, Int((pos / grain) % UInt64(header.numGTEsPerGT)))
        }) { view, i, pos, n in
            let g = view[i]
            if g == 0 { return .unallocated(length: n) }
            if g == 1 && header.zeroedGrains { return .zero(length: n) }
            if g * 512 >= end { end = file.end(cached: allocator.end) }
            guard g * 512 < end, g >= 1 else {
                throw BlockError.invalid(file: file.path, field: "grain table entry for offset \(pos)",
                                         detail: "grain at sector \(g) is past the end of the file")
            }
            if let m = metadata.overlap(g * 512, header.isCompressed ? 512 : grain) {
                throw BlockError.invalid(file: file.path, field: "grain table entry for offset \(pos)",
                                         detail: "grain at sector \(g) lies in \(m.what) (at sector \(m.start / 512))")
            }
            return header.isCompressed ? .compressed(host: g * 512, size: 0, length: n) : .data(host: g * 512 + pos % grain, length: n)
        }
    }

    func allocate(_ rel: UInt64, length: UInt64) throws -> (rel: UInt64, host: UInt64, length: UInt64) {
        let grain = header.grainBytes
        let start = rel.alignedDown(grain)
        let tableEnd = (rel / header.gtCoverage + 1) * header.gtCoverage
        let end = min((rel + length).alignedUp(grain), tableEnd, start + max(grain, (4 << 20) / grain * grain))
        let bytes = max(end - start, grain)
        return (start, try allocator.allocate(bytes), bytes)
    }

    /// Links grains the engine has written: grain table entries (and their redundant copies),
    /// creating a missing grain table first.
    func commit(rel: UInt64, host: UInt64, length: UInt64) throws {
        let gdi = rel / header.gtCoverage
        let first = (rel / header.grainBytes) % UInt64(header.numGTEsPerGT)
        // The redundant copy (grain table and directory) the same way, when the file has one;
        // a redundant table is made only with a new primary one (a damaged redundant
        // directory is left as it is).
        var primaryIsNew = false
        for (directory, redundant) in [(header.gdOffset, false)] + (header.hasRedundantGD ? [(header.rgdOffset, true)] : []) {
            var gt = try grainTable(gdi, redundant: redundant)
            let isNew = gt == 0 && (!redundant || primaryIsNew)
            if !redundant { primaryIsNew = isNew }
            if isNew { gt = try newTable() }
            if gt == 0 { continue }
            try TwoLevelLink.link(child: gt, isNew: isNew, first: first, count: length / header.grainBytes,
                                  { (host + $0 * header.grainBytes) / 512 },
                                  setEntry: { try tables.setEntry(table: $0, index: Int($1), value: $2) }) { child in
                try setDirectoryEntry(directory, gdi, child / 512)
            }
        }
    }

    /// A zeroed grain table at the end of the file (extending it reads as zeros).
    private func newTable() throws -> UInt64 {
        let off = try allocator.allocate(UInt64(header.gtBytes))
        try tables.createTable(at: off, bytes: UInt64(header.gtBytes), fresh: true, touched: off, metadata: metadata, what: "a grain table")
        return off
    }

    /// Whole grains read as zeros afterwards: zeroed-grain entries where the format has them,
    /// hole punching of allocated grains otherwise. Returns bytes handled from `rel`.
    func zero(_ rel: UInt64, length: UInt64, hasParent: Bool) throws -> UInt64 {
        let m = try map(rel, maxLength: length)
        switch m {
        case .zero: return m.length
        case .unallocated where !hasParent: return m.length
        case let .data(host, n):
            return try file.punchHole(offset: host, length: n) ? n : 0
        default: return 0
        }
    }

    func flush() throws { try writeBackChain.flush() }

    /// Grain tables, then the directory entries pointing at them (no barrier after).
    func writeBack() throws { try writeBackChain.writeChanges() }
}
