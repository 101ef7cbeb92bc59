import BlockEngine
import CDeflate
import Glibc

/// EWF (E01, SMART s01 and their EnCase/FTK/linen variants), read-only. Every chunk is
/// served through the engine's compressed path, compressed or not: a compressed chunk is
/// inflated whole (its zlib Adler-32 checked), a stored one read with its trailing Adler-32
/// and checked, so a damaged chunk reads as an I/O error naming it, never as other bytes.
/// Host addresses carry the segment number, so no run crosses segment files.
public final class EWFDriver: MultiFileMapping, ImageDriver {
    public let file: ImageFile
    public let info: ImageInfo
    public let segments: [ImageFile]
    public let media: EWFMedia
    public let caseInfo: EWFCaseInfo
    /// Which tool family wrote the set, as far as its sections tell.
    public let flavour: String
    let tables: EWFChunkTables
    let entries: TableCache
    let inflated: InflatedClusters
    let chunkBytes: UInt64
    /// Chunks whose Adler-32 this mount has checked (by chunk number; a compressed chunk's is
    /// its zlib stream's, checked when it is inflated whole): a later read of part of one
    /// reads only those bytes (stored) or inflates only that far (compressed). Not kept when
    /// other processes may write the files (--force-share); the mount's lock keeps the rest.
    let verified: AtomicBits?
    /// Compressed chunks this mount inflated whole, checked, to all zeros (unused space, much
    /// of most evidence): a later read of one is a memset, without a read or an inflate.
    /// Kept only with `verified`.
    let zeroChunks: AtomicBits?
    /// Each segment mapped for replies without a copy (`lend`), when first asked.
    let lent: [LentFile]

    public var readOnlyReason: String? { "evidence is always served read-only; --overlay takes writes" }
    public var contributingFiles: [ImageFile] { segments }
    public var hostAllocatedBytes: UInt64 { segments.reduce(0) { $0 + $1.allocatedBytes() } }
    public func hostFile(_ index: Int) -> ImageFile { segments[index] }
    public var storedDigests: [(algorithm: String, hex: String)] {
        [("md5", caseInfo.md5), ("sha1", caseInfo.sha1)].compactMap { a, h in h.map { (a, $0) } }
    }

    init(segments: [ImageFile], media: EWFMedia, caseInfo: EWFCaseInfo, tables: EWFChunkTables, flavour: String, notes: [String]) {
        file = segments[0]
        self.segments = segments
        self.media = media
        self.caseInfo = caseInfo
        self.tables = tables
        self.flavour = flavour
        chunkBytes = media.chunkBytes
        let tableBytes = tables.tableBytes
        let t = tables, files = segments
        entries = TableCache(file: segments[0], tableBytes: tableBytes, encoding: .u32LE,
                             capacity: max(4, (8 << 20) / tableBytes), loader: { try t.load(Int($0), files: files, tableBytes: tableBytes) })
        inflated = InflatedClusters(clusterBytes: Int(media.chunkBytes), budget: 16 << 20)
        verified = segments.contains { $0.sharedWithWriters } ? nil : AtomicBits(count: media.neededChunks)
        zeroChunks = verified == nil ? nil : AtomicBits(count: media.neededChunks)
        lent = segments.map { LentFile(file: $0) }
        var details: [(String, String)] = [("file format", flavour), ("segments", "\(segments.count)")]
        details += caseInfo.values.map { ($0.name, $0.value.escapingControls) }
        details.append(("bytes per sector", "\(media.bytesPerSector)"))
        details.append(("sectors", "\(media.sectorCount)"))
        details.append(("sectors per chunk", "\(media.sectorsPerChunk)"))
        if let t = media.mediaTypeText { details.append(("media type", t)) }
        if let p = media.isPhysical { details.append(("is physical", p ? "yes" : "no")) }
        if let c = media.compressionText { details.append(("compression level", c)) }
        if let g = media.errorGranularity, g > 0 { details.append(("error granularity", "\(g)")) }
        if let s = media.setIdentifierText { details.append(("set identifier", s)) }
        details.append(("stored MD5", caseInfo.md5 ?? "none"))
        details.append(("stored SHA1", caseInfo.sha1 ?? "none"))
        details.append(("acquisition errors", caseInfo.errors.isEmpty ? "none" : caseInfo.errors.prefix(Self.errorsShown).map {
            "sectors \($0.first)-\($0.first + max($0.count, 1) - 1)"
        }.joined(separator: ", ") + (caseInfo.errors.count > Self.errorsShown ? " and \(caseInfo.errors.count - Self.errorsShown) more" : "")))
        details += notes.map { ("warning", $0) }
        details.append(("holes", "none (EWF stores every chunk; zeros are stored data)"))
        info = ImageInfo(format: "ewf", virtualSize: media.mediaSize, clusterSize: chunkBytes, details: details)
    }

    static let errorsShown = 32

    /// Chunk `c`: its segment, where its stored bytes start, how many, and whether they are
    /// a zlib stream (else the chunk's bytes and their Adler-32).
    func chunk(_ c: UInt64) throws -> (segment: Int, offset: UInt64, stored: UInt64, compressed: Bool) {
        let ti = tables.tableIndex(of: c)
        let t = tables.tables[ti]
        let k = Int(c - t.firstChunk)
        let (e, following) = try entries.withEntries(table: UInt64(ti)) { v in
            (v[k], k + 1 < t.count ? v[k + 1] : nil)
        }
        let segment = segments[t.segment]
        func bad(_ detail: String) -> BlockError {
            .invalid(file: segment.path, field: "EWF chunk \(c) (table at \(t.entries - 24), entry \(k))", detail: detail)
        }
        let compressed = e & 0x8000_0000 != 0
        let (at, overflow) = t.base.addingReportingOverflow(e & 0x7FFF_FFFF)
        guard !overflow, at >= t.dataStart, at < t.dataEnd else {
            throw bad("offset \(e & 0x7FFF_FFFF) from base \(t.base) lies outside its chunk data (\(t.dataStart)-\(t.dataEnd))")
        }
        // Stored bytes end where the next chunk starts, or at the end of the chunk data.
        var end = t.dataEnd
        if let f = following {
            let next = t.base &+ (f & 0x7FFF_FFFF)
            if next > at && next < end { end = next }
        }
        let length = min(chunkBytes, media.mediaSize - c * chunkBytes)
        if compressed {
            let stored = end - at
            guard stored <= chunkBytes + chunkBytes / 8 + 1024 else {
                throw bad("a compressed chunk of \(stored) bytes, more than any deflate stream of a \(chunkBytes)-byte chunk")
            }
            return (t.segment, at, stored, true)
        }
        guard end - at >= length + 4 else {
            throw bad("a stored chunk needs \(length + 4) bytes, only \(end - at) remain before \(end)")
        }
        // The last chunk may hold a trailing part-sector beyond the counted sectors (ewfacquire
        // of a source whose size is not whole sectors): its checksum covers those bytes too.
        if c + 1 == media.neededChunks, end - at - 4 <= chunkBytes { return (t.segment, at, end - at, false) }
        return (t.segment, at, length + 4, false)
    }

    /// The stored size's top bit in a mapping says the chunk is compressed, so a read does not
    /// look the chunk up twice.
    static let compressedFlag: UInt64 = 1 << 63

    public func map(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        let c = offset / chunkBytes
        let n = min(maxLength, min((c + 1) * chunkBytes, media.mediaSize) - offset)
        let ch = try chunk(c)
        return .compressed(host: HostAddress(file: ch.segment, offset: ch.offset).packed,
                           size: ch.stored | (ch.compressed ? Self.compressedFlag : 0), length: n)
    }

    public func readCompressed(_ mapping: Mapping, guestOffset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        guard case let .compressed(host, size, _) = mapping else { return }
        let a = HostAddress(packed: host)
        let ch = (segment: a.file, offset: a.offset, stored: size & ~Self.compressedFlag, compressed: size & Self.compressedFlag != 0)
        let c = guestOffset / chunkBytes
        let inChunk = Int(guestOffset - c * chunkBytes)
        let length = Int(min(chunkBytes, media.mediaSize - c * chunkBytes))
        if ch.compressed, let zeroChunks, zeroChunks.contains(c) {
            memset(buffer.baseAddress!, 0, buffer.count)
            return
        }
        // A read of a whole chunk (sequential reads) goes straight into the caller's buffer:
        // no copy, no cache entry it would never use again.
        if inChunk == 0, buffer.count == length, try readWhole(c, ch, into: buffer) { return }
        if !ch.compressed, let verified, verified.contains(c) {
            try segments[ch.segment].read(into: buffer, at: ch.offset + UInt64(inChunk), what: "EWF chunk \(c)")
            return
        }
        // A compressed chunk checked once this mount: inflated only as far as the read needs
        // (zlib stops there; on average half the chunk for random reads).
        let checked = ch.compressed && verified?.contains(c) == true
        let bytes = try chunkData(c, ch, need: checked ? inChunk + buffer.count : nil)
        bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[inChunk..<(inChunk + buffer.count)])) }
    }

    /// A request's chunks: runs of two or more whole stored chunks lying back to back in one
    /// segment are read with one preadv per part of up to `storedPartBytes` (the chunks
    /// straight into the caller's buffer, their checksums beside them), then checked; every
    /// other piece (compressed, partial, a stored chunk alone) through the one-chunk path.
    /// Parts and pieces are spread over the cores only when that pays: two or more chunks to
    /// inflate, or more stored bytes than one core copies in the time it takes to wake
    /// another; a 128 KiB read of stored and zero chunks is read on the calling thread.
    public func readCompressed(_ pieces: [CompressedPiece]) throws {
        var parts: [ArraySlice<CompressedPiece>] = [], others: [CompressedPiece] = []
        var inflating = 0, copying = 0
        var i = 0
        while i < pieces.count {
            guard let a = storedWhole(pieces[i]) else {
                if inflates(pieces[i]) { inflating += 1 } else { copying += pieces[i].piece.count }
                others.append(pieces[i]); i += 1; continue
            }
            var j = i + 1, end = a.offset + a.stored, bytes = a.stored
            while j < pieces.count, let b = storedWhole(pieces[j]), b.segment == a.segment, b.offset == end,
                  b.chunk == a.chunk + UInt64(j - i), bytes + b.stored <= Self.storedPartBytes {
                end += b.stored; bytes += b.stored; j += 1
            }
            if j - i > 1 { parts.append(pieces[i..<j]) } else { others.append(pieces[i]) }
            copying += Int(bytes)
            i = j
        }
        let read = { (k: Int) throws in
            if k < parts.count { try self.readStored(parts[k]) } else {
                let p = others[k - parts.count]
                try self.readCompressed(p.mapping, guestOffset: p.guestOffset, into: p.piece)
            }
        }
        if inflating < 2 && copying <= Self.copiedOnOneCore {
            for k in 0 ..< parts.count + others.count { try read(k) }
        } else {
            try eachOnAllCores(parts.count + others.count, read)
        }
    }

    /// A read of chunks this mount has checked, stored ones (mapped from their segment) and
    /// zero ones, is answered from memory without a copy; any other chunk, or a read of more
    /// regions than a reply takes, is read. Never with --force-share (`verified` is nil).
    public func lend(_ offset: UInt64, count: Int) -> [UnsafeRawBufferPointer]? {
        guard let verified, let zeroChunks else { return nil }
        var regions: [UnsafeRawBufferPointer] = []
        regions.reserveCapacity(min(Self.lentRegions, count / Int(chunkBytes) + 2))
        var pos = offset
        let end = offset + UInt64(count)
        while pos < end {
            let c = pos / chunkBytes
            let n = Int(min(end, (c + 1) * chunkBytes) - pos)
            guard verified.contains(c), regions.count < Self.lentRegions, let ch = try? chunk(c) else { return nil }
            if ch.compressed {
                guard zeroChunks.contains(c), LentFile.appendZeros(n, to: &regions) else { return nil }
            } else {
                guard let bytes = lent[ch.segment].bytes(at: ch.offset + (pos - c * chunkBytes), count: n) else { return nil }
                regions.append(bytes)
            }
            pos += UInt64(n)
        }
        return regions
    }

    /// Regions one lent reply holds at most (each one an iovec of the reply's writev).
    static let lentRegions = 256

    /// Stored bytes a request copies on its own thread at most (waking another core costs
    /// about as much as copying this much).
    static let copiedOnOneCore = 256 << 10

    /// Whether reading the piece inflates a chunk (not a stored one, nor one known to be zeros).
    private func inflates(_ p: CompressedPiece) -> Bool {
        guard case let .compressed(_, size, _) = p.mapping, size & Self.compressedFlag != 0 else { return false }
        return !(zeroChunks?.contains(p.guestOffset / chunkBytes) ?? false)
    }

    /// Stored chunks one preadv reads together at most (more go to another core).
    static let storedPartBytes: UInt64 = 128 << 10 + 64

    /// The piece's chunk, when the piece is the whole of a stored chunk followed by its checksum.
    private func storedWhole(_ p: CompressedPiece) -> (segment: Int, offset: UInt64, stored: UInt64, chunk: UInt64)? {
        guard case let .compressed(host, size, _) = p.mapping, size & Self.compressedFlag == 0 else { return nil }
        let c = p.guestOffset / chunkBytes
        guard p.guestOffset == c * chunkBytes, size == UInt64(p.piece.count) + 4,
              UInt64(p.piece.count) == min(chunkBytes, media.mediaSize - c * chunkBytes) else { return nil }
        let a = HostAddress(packed: host)
        return (a.file, a.offset, size, c)
    }

    /// Consecutive whole stored chunks, back to back in one segment: one preadv, then each
    /// chunk's Adler-32 unless this mount checked it before.
    private func readStored(_ run: ArraySlice<CompressedPiece>) throws {
        let first = storedWhole(run.first!)!
        var sums = [UInt32](repeating: 0, count: run.count)
        try sums.withUnsafeMutableBytes { s in
            var buffers: [UnsafeMutableRawBufferPointer] = []
            buffers.reserveCapacity(2 * run.count)
            for (k, p) in run.enumerated() {
                buffers.append(p.piece)
                buffers.append(UnsafeMutableRawBufferPointer(rebasing: s[(4 * k) ..< (4 * k + 4)]))
            }
            try segments[first.segment].read(scatter: buffers, at: first.offset,
                                             what: "EWF chunks \(first.chunk)-\(first.chunk + UInt64(run.count) - 1)")
        }
        var at = first.offset
        for (k, p) in run.enumerated() {
            let c = first.chunk + UInt64(k)
            defer { at += UInt64(p.piece.count) + 4 }
            if let verified, verified.contains(c) { continue }
            guard ewfAdler32(UnsafeRawBufferPointer(p.piece)) == UInt32(littleEndian: sums[k]) else {
                throw damagedStored(c, at: at, length: p.piece.count, segment: first.segment)
            }
            verified?.insert(c)
        }
    }

    /// Chunk `c`, all of it, checked, into `buffer`; false when only the cached path can
    /// (a last chunk with a part-sector tail, a stream libdeflate does not take exactly).
    private func readWhole(_ c: UInt64, _ ch: (segment: Int, offset: UInt64, stored: UInt64, compressed: Bool),
                           into buffer: UnsafeMutableRawBufferPointer) throws -> Bool {
        let segment = segments[ch.segment]
        if !ch.compressed {
            guard ch.stored == UInt64(buffer.count) + 4 else { return false }
            var sum: UInt32 = 0
            try withUnsafeMutableBytes(of: &sum) { try segment.read(into: buffer, then: $0, at: ch.offset, what: "EWF chunk \(c)") }
            guard ewfAdler32(UnsafeRawBufferPointer(buffer)) == UInt32(littleEndian: sum) else {
                throw damagedStored(c, at: ch.offset, length: buffer.count, segment: ch.segment)
            }
            verified?.insert(c)
            return true
        }
        guard c + 1 < media.neededChunks || UInt64(buffer.count) == chunkBytes else { return false }
        let stored = try Decompress.stored(segment, count: Int(ch.stored), at: ch.offset)
        guard stored.withUnsafeBytes({ rm_libdeflate_exact($0.baseAddress, $0.count, buffer.baseAddress, buffer.count, 1) == 0 }) else { return false }
        checkedWhole(c, UnsafeRawBufferPointer(buffer))
        return true
    }

    /// Stored chunk `c` at `offset` of segment `segment` failed its Adler-32.
    private func damagedStored(_ c: UInt64, at offset: UInt64, length: Int, segment: Int) -> BlockError {
        .invalid(file: segments[segment].path, field: chunkName(c, offset, length: length),
                 detail: "checksum mismatch (the stored chunk is damaged)")
    }

    private func chunkName(_ c: UInt64, _ offset: UInt64, length: Int) -> String {
        let first = c * UInt64(media.sectorsPerChunk)
        return "EWF chunk \(c) (sectors \(first)-\(first + UInt64(length) / UInt64(media.bytesPerSector) - 1), at \(offset))"
    }

    /// The whole of chunk `c`, checked (kept a while for the next small read in it); with
    /// `need`, of a compressed chunk already checked, at least its first `need` bytes.
    func chunkData(_ c: UInt64, _ ch: (segment: Int, offset: UInt64, stored: UInt64, compressed: Bool), need: Int? = nil) throws -> [UInt8] {
        let length = Int(min(chunkBytes, media.mediaSize - c * chunkBytes))
        let key = HostAddress(file: ch.segment, offset: ch.offset).packed
        return try inflated.cluster(at: key, need: need ?? length) { limit in
            let segment = segments[ch.segment]
            let what = chunkName(c, ch.offset, length: length)
            var stored = try Decompress.stored(segment, count: Int(ch.stored), at: ch.offset)
            if ch.compressed {
                if c + 1 == media.neededChunks, UInt64(length) < chunkBytes {
                    // Possibly a trailing part-sector more (see `chunk`): inflate to the end.
                    return Array(try Decompress.complete(stored, atMost: Int(chunkBytes), atLeast: length, file: segment.path, what: what)[0..<length])
                }
                if need != nil, limit < length {
                    return try Decompress.first(limit, of: stored, as: .zlib, whole: length, file: segment.path, what: what)
                }
                let whole = try Decompress.first(length, of: stored, as: .zlib, whole: length, file: segment.path, what: what)
                whole.withUnsafeBytes { checkedWhole(c, $0) }
                return whole
            }
            let sum = stored.count - 4
            guard stored.count == Int(ch.stored), sum >= length else {
                throw BlockError.truncated(file: segment.path, what: what, offset: ch.offset, needed: ch.stored, fileSize: try segment.size())
            }
            guard ewfAdler32(stored[0..<sum]) == le32(stored, sum) else {
                throw damagedStored(c, at: ch.offset, length: length, segment: ch.segment)
            }
            stored.removeLast(stored.count - length)  // the checksum (and a part-sector tail): no copy
            verified?.insert(c)
            return stored
        }
    }

    /// Compressed chunk `c` was inflated whole and its Adler-32 matched.
    private func checkedWhole(_ c: UInt64, _ bytes: UnsafeRawBufferPointer) {
        verified?.insert(c)
        if UInt64(bytes.count) == chunkBytes, TableCache.allBytes(bytes.baseAddress, bytes.count, equal: 0) { zeroChunks?.insert(c) }
    }

    public func close() throws {}
}
