import BlockEngine
#if canImport(Glibc)
import Glibc
#endif

/// Where a VHD block gets allocated and how it becomes durable. A new block goes where the
/// footer is (QEMU's free_data_block_offset): its sector bitmap (all ones: QEMU fills a new
/// block whole and reads a present block whole), its data, and the footer moves past it.
/// Order on disk: the data; then the bitmap and the footer at the new end of the file; then
/// the table entry that names the block; each step durable before the next (the table
/// cache's barrier does the first two). A crash before the table entry leaves a block
/// nobody names, which the next allocation overwrites, as QEMU would.
extension VHDDriver {
    public func allocate(_ offset: UInt64, length: UInt64) throws -> Allocation {
        guard isWritable else { throw BlockError.readOnly(file: file.path) }
        guard let h = dynamic else {
            // A fixed disk whose stated size runs past its data: nothing to grow into.
            throw BlockError.io(file: file.path, operation: "write past the data of a fixed VHD", offset: offset, errno: ENOSPC)
        }
        let (free, unwrittenFrom) = frontier.withLock { ($0.free, $0.unwrittenFrom) }
        // Table entries are 32-bit sector numbers (0xFFFFFFFF: not present).
        guard free / 512 < Self.notPresent, free + h.bitmapBytes + h.blockSize <= 0xFFFF_FFFF * 512 else {
            throw BlockError.io(file: file.path, operation: "allocate a block past the 2 TiB a VHD table can address", offset: offset, errno: EFBIG)
        }
        let data = free + h.bitmapBytes
        return Allocation(guestOffset: offset.alignedDown(h.blockSize), hostOffset: data, length: h.blockSize,
                          fresh: data >= unwrittenFrom)
    }

    /// The block stays the next one handed out (the frontier moves only at `commit`), but
    /// no longer as fresh: the failed write may have left bytes in it.
    public func abandon(_ a: Allocation) {
        frontier.withLock { $0.unwrittenFrom = max($0.unwrittenFrom, a.hostOffset + a.length) }
    }

    public func commit(_ a: Allocation) throws {
        guard let table, let h = dynamic else { return }
        let bitmap = a.hostOffset - h.bitmapBytes
        frontier.withLock { s in
            s.free = max(s.free, a.hostOffset + a.length)
            s.pendingBitmaps.append(bitmap)
            s.footerMoved = true
            s.presentBlocks += 1
        }
        try table.setEntry(a.guestOffset / h.blockSize, bitmap / 512)
        preallocator?.reached(a.hostOffset + a.length + h.bitmapBytes + h.blockSize)
    }

    /// The table cache's barrier: data durable, then the bitmaps of the blocks about to be
    /// named and the footer at the end of the file, durable too.
    func writeBlockFrames() throws {
        try file.sync()
        guard let h = dynamic else { return }
        let (bitmaps, footerAt) = frontier.withLock { s -> ([UInt64], UInt64?) in
            defer { s.pendingBitmaps = []; s.footerMoved = false }
            return (s.pendingBitmaps, s.footerMoved ? s.free : nil)
        }
        guard !bitmaps.isEmpty || footerAt != nil else { return }
        do {
            let ones = [UInt8](repeating: 0xFF, count: Int(h.bitmapBytes))
            for b in bitmaps { try file.write(ones, at: b) }
            if let footerAt { try file.write(footer.raw, at: footerAt) }
            try file.sync()
        } catch {
            frontier.withLock { s in
                s.pendingBitmaps = bitmaps + s.pendingBitmaps
                s.footerMoved = s.footerMoved || footerAt != nil
            }
            throw error
        }
    }

    public func metadataOverlap(host: UInt64, length: UInt64) -> MetadataRanges.Range? { metadata.overlap(host, length) }

    /// Table entries after the data they name; a fixed disk has only its data to sync.
    public func flush() throws {
        guard isWritable else { return }
        if let table { try table.flush() }
        try file.sync()
    }

    public func close() throws {
        defer { preallocator?.release() }
        try flush()
    }
}
