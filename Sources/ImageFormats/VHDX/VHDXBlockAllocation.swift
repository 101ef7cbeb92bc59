import BlockEngine
#if canImport(Glibc)
import Glibc
#endif

/// Where a VHDX block gets allocated and how its table entry reaches the disk. A new block
/// goes at the end of the file, rounded up to a MiB (as QEMU puts it); the table entry
/// (offset in MiB, state fully present) changes in the cache. At write-back: the data is
/// made durable and the file grown to cover every linked block; then the changed table
/// sectors go through the log as QEMU writes them: a new log GUID in both headers, one log
/// entry with the sectors, durable; the sectors written in place, durable; the log emptied
/// (both headers with a zero log GUID). A crash leaves either the old table, or a log that
/// the next writable open (rawmount's or QEMU's) replays.
extension VHDXDriver {
    public func willWrite() throws { try headers.willWriteData() }

    public func allocate(_ offset: UInt64, length: UInt64) throws -> Allocation {
        guard isWritable else { throw BlockError.readOnly(file: file.path) }
        let bs = metadata.blockSize
        let (next, unwrittenFrom) = frontier.withLock { ($0.next, $0.unwrittenFrom) }
        // Entries hold the offset in MiB in 44 bits.
        guard next / Self.mib < 1 << 44 else {
            throw BlockError.io(file: file.path, operation: "allocate a block past what a VHDX table can address", offset: offset, errno: EFBIG)
        }
        return Allocation(guestOffset: offset.alignedDown(bs), hostOffset: next, length: bs, fresh: next >= unwrittenFrom)
    }

    /// The block stays the next one handed out, no longer as fresh.
    public func abandon(_ a: Allocation) {
        frontier.withLock { $0.unwrittenFrom = max($0.unwrittenFrom, a.hostOffset + a.length) }
    }

    public func commit(_ a: Allocation) throws {
        let bs = metadata.blockSize, block = a.guestOffset / bs
        frontier.withLock { s in
            s.next = max(s.next, a.hostOffset + a.length)
            s.committedEnd = max(s.committedEnd, a.hostOffset + a.length)
            s.presentBlocks += 1
        }
        try table.setEntry(block + block / metadata.chunkRatio, a.hostOffset | State.fullyPresent.rawValue)
        preallocator?.reached(a.hostOffset + 2 * a.length)
    }

    /// The table cache's barrier: data durable, and the file long enough for every block an
    /// entry is about to name (a block only partly written ends past the file's end).
    func coverCommittedBlocks() throws {
        try file.sync()
        let end = frontier.withLock { $0.committedEnd }
        if try file.size() < end {
            try file.truncate(to: end)
            try file.sync()
        }
    }

    /// The table cache's journal: changed table sectors through the log, then in place.
    func writeThroughLog(_ tables: [(offset: UInt64, bytes: [UInt8])]) throws {
        let perEntry = VHDXLog.maxSectorsPerEntry(logLength: header.logLength)
        guard header.logLength > 0 else {
            throw BlockError.unsupported(file: file.path, feature: "writing a VHDX without a log region")
        }
        // (Table chunks are whole 4 KiB log sectors: the table starts on a MiB.)
        guard tables.allSatisfy({ $0.bytes.count == VHDXLog.sector && $0.offset % UInt64(VHDXLog.sector) == 0 }) else {
            throw BlockError.invalid(file: file.path, field: "VHDX block allocation table", detail: "not in whole 4 KiB sectors")
        }
        var rest = tables[...]
        while !rest.isEmpty {
            let batch = Array(rest.prefix(perEntry))
            rest = rest.dropFirst(batch.count)
            let guid = VHDXGUID(bytes: randomGUID())
            try headers.update(logGUID: guid)
            let seq = frontier.withLock { s -> UInt64 in defer { s.logSequence += 1 }; return s.logSequence }
            let entry = VHDXLog.encode(batch, sequence: seq, logGUID: guid, fileSize: try file.size())
            try file.write(entry, at: header.logOffset)
            try file.sync()
            if Self.testPauseAfterLog > 0 { usleep(Self.testPauseAfterLog) }
            for t in batch { try file.write(t.bytes, at: t.offset) }
            try file.sync()
            try headers.update(logGUID: VHDXGUID(bytes: [UInt8](repeating: 0, count: 16)))
        }
    }

    /// Tests only: a pause between a durable log entry and its sectors in place, so a kill -9
    /// can land exactly there (the next writable open must replay it).
    static let testPauseAfterLog: UInt32 = getenv("RAWMOUNT_TEST_VHDX_PAUSE_AFTER_LOG_US").flatMap { UInt32(String(cString: $0)) } ?? 0

    public func metadataOverlap(host: UInt64, length: UInt64) -> MetadataRanges.Range? { structures.overlap(host, length) }

    public func flush() throws {
        guard isWritable else { return }
        try table.flush()
        try file.sync()
    }

    public func close() throws {
        defer { preallocator?.release() }
        try flush()
    }
}
