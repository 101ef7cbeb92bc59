import BlockEngine

/// Compressed clusters written (`convert -c`), packed as QEMU packs them: each stream goes at
/// the next free byte of the cluster being filled, continuing into the next cluster when
/// that one is the next in the file, else starting a fresh cluster; every host cluster a
/// stream touches counts it once. Data first, then refcounts, then the L2 entry (the L2
/// cache's barrier orders them).
extension QCOW2Driver: CompressedClusterSink {
    public var unitBytes: UInt64 { header.clusterSize }

    /// Raw deflate, kept only when shorter than a cluster (QEMU's rule).
    public func compress(_ unit: UnsafeRawBufferPointer, with compressor: DeflateCompressor) -> [UInt8]? {
        compressor.compress(unit, limit: Int(header.clusterSize) - 1)
    }

    /// Stores `stream` (the raw deflate of a whole cluster, the disk's last one zero-padded)
    /// as the guest cluster at `guestOffset`, which must be unallocated. Callers write one
    /// cluster at a time (convert's single writer).
    public func storeCompressed(_ stream: [UInt8], at guestOffset: UInt64) throws {
        let refcounts = try writer
        let cs = header.clusterSize, size = UInt64(stream.count)
        guard guestOffset % cs == 0, size > 0, size < cs, header.compressionType == 0 else {
            throw BlockError.usage("\(file.path): a compressed cluster must be a whole deflate cluster shorter than \(cs) bytes")
        }
        guard try l2Entry(guestOffset) == 0 else {
            throw BlockError.usage("\(file.path): compressed clusters are written only where nothing is allocated yet")
        }
        let table = try writableL2(for: guestOffset)
        let host = try compressedTail.withLock { tail -> UInt64 in
            var at = tail
            if at != 0 && cs - at % cs >= size {
                try refcounts.change(bytes: at, length: 1, by: 1)  // another stream in this cluster
            } else {
                let n = try refcounts.allocate(maxClusters: 1)
                if at != 0 && n.offset == at.alignedUp(cs) {
                    try refcounts.change(bytes: at, length: 1, by: 1)  // starts in the old cluster, ends in the new one
                } else {
                    at = n.offset
                }
            }
            tail = (at + size) % cs == 0 ? 0 : at + size
            return at
        }
        try file.write(stream, at: host)
        let extraSectors = (host + size - 1) / 512 - host / 512
        let shift = 62 - (UInt64(header.clusterBits) - 8)
        try setL2(table, guestOffset, entry: Self.compressedFlag | extraSectors << shift | host, bitmap: 0)
    }

    /// The L2 entry of the guest cluster at `offset` (0 without a table).
    private func l2Entry(_ offset: UInt64) throws -> UInt64 {
        let table = try l1.entry(offset / header.l1Coverage) & Self.offsetMask
        guard table != 0 else { return 0 }
        return try l2Entry(table, (offset / header.clusterSize) % header.l2Entries).entry
    }
}
