import BlockEngine

/// Host clusters that hold compressed data and are also named as a plain data cluster by
/// some L2 entry. A consistent image has none (the refcount would count both owners, and
/// QEMU's writer never puts compressed bytes in a data cluster); a crafted one can, and then
/// releasing the compressed entry would drop the refcount to 0 and free (punch, reuse) the
/// other cluster's data. Built by one pass over the active L2 tables the first time a
/// compressed entry is released, so its cost follows the metadata and images without
/// compressed clusters never pay it. Later allocations only take clusters with refcount 0,
/// which no compressed entry of a consistent image touches, so the set stays valid.
struct QCOW2CompressedOwners {
    /// Cluster-aligned host offsets named both by a compressed range and a data entry.
    let sharedWithData: Set<UInt64>

    /// Scans every L2 table the active L1 names (all slices, all entries).
    init(_ driver: QCOW2Driver) throws {
        let h = driver.header, cs = h.clusterSize
        var compressed = Set<UInt64>()
        var dataClusters: [UInt64] = []
        try Self.forEachEntry(driver) { e in
            if e & QCOW2Driver.compressedFlag != 0 {
                let r = h.compressedRange(e)
                guard r.bytes > 0 else { return }
                var c = r.host.alignedDown(cs)
                // A range spans at most two clusters (sizes are bounded by the entry's bits).
                while c < r.host &+ r.bytes, c >= r.host.alignedDown(cs) { compressed.insert(c); c &+= cs }
            } else if e & QCOW2Driver.offsetMask != 0 {
                dataClusters.append(e & QCOW2Driver.offsetMask)
            }
        }
        sharedWithData = compressed.isEmpty ? [] : Set(dataClusters.lazy.filter { compressed.contains($0.alignedDown(cs)) })
    }

    /// The first cluster of `[host, host+bytes)` (a compressed range) that is also data, if any.
    func dataCluster(in host: UInt64, bytes: UInt64, clusterSize cs: UInt64) -> UInt64? {
        guard !sharedWithData.isEmpty else { return nil }
        var c = host.alignedDown(cs)
        while c < host &+ bytes, c >= host.alignedDown(cs) {
            if sharedWithData.contains(c) { return c }
            c &+= cs
        }
        return nil
    }

    /// Calls `body` with the first word of every L2 entry of the active tables.
    private static func forEachEntry(_ driver: QCOW2Driver, _ body: (UInt64) -> Void) throws {
        let h = driver.header
        let words = Int(h.l2EntryBytes / 8)
        let slices = h.clusterSize / driver.l2SliceBytes
        for i in 0 ..< driver.l1.entries {
            // A damaged L1 entry (outside the file, aliasing metadata) names no table a guest
            // can use; it must not stop writes elsewhere, so it is passed over here.
            guard let table = try? driver.l2Table(i), table != 0 else { continue }
            for s in 0 ..< slices {
                try driver.l2.withEntries(table: table + s * driver.l2SliceBytes) { view in
                    for w in stride(from: 0, to: view.count, by: words) { body(view[w]) }
                }
            }
        }
    }
}
