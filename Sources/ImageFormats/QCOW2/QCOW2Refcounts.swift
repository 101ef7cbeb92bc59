import BlockEngine
import Glibc
import Synchronization

/// Refcounts of 1 to 64 bits packed in a refcount block, as QEMU stores them: widths of 8
/// bits and more are big-endian; narrower ones fill each byte from its lowest bit up.
struct RefcountCodec: Sendable {
    let bits: UInt64
    var max: UInt64 { bits == 64 ? .max : (1 << bits) - 1 }

    func get(_ b: [UInt8], _ i: Int) -> UInt64 {
        if bits < 8 {
            let bit = i * Int(bits)
            return UInt64(b[bit / 8] >> UInt8(bit % 8)) & max
        }
        let n = Int(bits / 8), o = i * n
        var v: UInt64 = 0
        for k in 0..<n { v = v << 8 | UInt64(b[o + k]) }
        return v
    }

    func set(_ b: inout [UInt8], _ i: Int, _ v: UInt64) {
        if bits < 8 {
            let bit = i * Int(bits), shift = UInt8(bit % 8), mask = UInt8(max) << shift
            b[bit / 8] = b[bit / 8] & ~mask | UInt8(v) << shift & mask
            return
        }
        let n = Int(bits / 8), o = i * n
        for k in 0..<n { b[o + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(n - 1 - k))) }
    }
}

/// A qcow2 image's refcounts and the cluster allocator built on them. Free space is any
/// cluster whose refcount is 0 (a missing refcount block means its whole range is free);
/// new refcount blocks describe themselves, and the refcount table grows into a fresh,
/// self-describing area (as QEMU lays it out). Freed clusters are only queued here: the
/// driver applies them once the tables that stopped pointing at them are durable, so a
/// crash never leaves a cluster with two owners.
final class QCOW2Refcounts: Sendable {
    let file: ImageFile
    let clusterSize: UInt64
    let codec: RefcountCodec
    /// Refcounts per block (one cluster).
    let perBlock: UInt64
    /// Refcount table entries that had reserved bits (0-8) set, for `check` (the first 1000).
    let entriesWithReservedBits: [UInt64]
    /// Blocks are cached in slices of at most 4 KiB, like L2 tables.
    let blocks: TableCache
    let sliceBytes: UInt64
    var perSlice: UInt64 { sliceBytes * 8 / codec.bits }

    /// The refcount table, held whole; changed only under `state`.
    let table: HeldTable
    /// Blocks, then (after a barrier, so the table never names a block that is not on
    /// disk) the table: the first layers of the driver's write-back chain.
    let chain: WriteBackChain

    struct State: ~Copyable {
        /// No cluster below this one is free.
        var freeHint: UInt64 = 1
        /// Clusters in the file or handed out (fresh space starts here).
        var endCluster: UInt64
        /// Host byte ranges no longer referenced by tables that may not be durable yet.
        var pendingFree: [(start: UInt64, length: UInt64)] = []
    }
    private let state: Mutex<State>
    /// `endCluster` in bytes, for lock-free range checks on the read path.
    private let endBytes: Atomic<UInt64>
    var end: UInt64 { endBytes.load(ordering: .relaxed) }
    /// Clusters that must never be handed out (a repair's computed references).
    private let excluded: (@Sendable (UInt64) -> Bool)?

    /// The image's metadata ranges, kept up to date as blocks and tables move.
    private let metadata: MetadataRanges?

    init(file: ImageFile, header h: QCOW2Header, fileSize: UInt64, metadata: MetadataRanges? = nil,
         excluded: (@Sendable (UInt64) -> Bool)? = nil) throws {
        self.file = file
        self.metadata = metadata
        clusterSize = h.clusterSize
        codec = RefcountCodec(bits: h.refcountBits)
        perBlock = h.clusterSize * 8 / h.refcountBits
        sliceBytes = min(h.clusterSize, 4096)
        blocks = TableCache(file: file, tableBytes: Int(sliceBytes), encoding: .u64BE, capacity: 1024)
        self.excluded = excluded
        try h.checkRefcountTable(fileSize: fileSize, path: file.path)
        let entries = UInt64(h.refcountTableClusters) * h.clusterSize / 8
        var table = [UInt64](repeating: 0, count: Int(entries))
        var reserved: [UInt64] = []
        try FlatTable.forEachEntry(file, start: h.refcountTableOffset, count: entries, encoding: .u64BE, what: "qcow2 refcount table") { i, e in
            table[Int(i)] = e & ~UInt64(0x1FF)  // bits 0-8 are reserved
            if e & 0x1FF != 0 && reserved.count < 1000 { reserved.append(i) }
        }
        entriesWithReservedBits = reserved
        let held = HeldTable(file: file, offset: h.refcountTableOffset, entries: table)
        self.table = held
        chain = WriteBackChain([.init(blocks), .init(held)], barrier: { [file] in try file.sync() })
        state = Mutex(State(endCluster: (fileSize + h.clusterSize - 1) / h.clusterSize))
        endBytes = Atomic((fileSize + h.clusterSize - 1) / h.clusterSize * h.clusterSize)
    }

    private func extendEnd(_ s: inout State, to cluster: UInt64) {
        guard cluster > s.endCluster else { return }
        s.endCluster = cluster
        endBytes.store(cluster * clusterSize, ordering: .relaxed)
    }

    var tableRange: (offset: UInt64, bytes: UInt64) {
        state.withLock { _ in (table.offset, UInt64(table.count) * 8) }
    }
    /// Every refcount block's host offset (for metadata ranges and checks).
    var blockOffsets: [UInt64] { state.withLock { _ in table.all.filter { $0 != 0 } } }
    /// The refcount table indices that name a block (block i covers clusters from i * perBlock).
    var blockIndices: [UInt64] {
        state.withLock { _ in
            let t = table.all
            return t.indices.filter { t[$0] != 0 }.map(UInt64.init)
        }
    }

    // MARK: reading and changing single refcounts

    func refcount(_ cluster: UInt64) throws -> UInt64 {
        try state.withLock { try refcountLocked(&$0, cluster) }
    }

    private func blockOffset(_ s: borrowing State, _ cluster: UInt64) throws -> UInt64? {
        let bi = cluster / perBlock
        guard bi < UInt64(table.count), table.entry(Int(bi)) != 0 else { return nil }
        let b = table.entry(Int(bi))
        guard b % clusterSize == 0 else {
            throw BlockError.invalid(file: file.path, field: "refcount table entry \(bi)", detail: "block offset \(b) is not cluster aligned")
        }
        return b
    }

    private func refcountLocked(_ s: inout State, _ cluster: UInt64) throws -> UInt64 {
        guard let b = try blockOffset(s, cluster) else { return 0 }
        let i = cluster % perBlock
        return try blocks.withBytes(table: b + (i / perSlice) * sliceBytes) { codec.get($0, Int(i % perSlice)) }
    }

    private func setLocked(_ s: inout State, _ cluster: UInt64, _ value: UInt64) throws {
        guard let b = try blockOffset(s, cluster) else {
            throw BlockError.invalid(file: file.path, field: "refcount table", detail: "no refcount block covers cluster \(cluster)")
        }
        let i = cluster % perBlock
        try blocks.modify(table: b + (i / perSlice) * sliceBytes) { codec.set(&$0, Int(i % perSlice), value) }
    }

    /// Adds `delta` to the refcount of every cluster `[start, start+length)` touches.
    private func changeLocked(_ s: inout State, bytes start: UInt64, length: UInt64, by delta: Int64) throws {
        guard length > 0 else { return }
        var c = start / clusterSize
        let last = (start + length - 1) / clusterSize
        while c <= last {
            if delta > 0 { try ensureBlockLocked(&s, for: c) }
            let old = try refcountLocked(&s, c)
            let (new, bad) = delta >= 0 ? old.addingReportingOverflow(UInt64(delta)) : old.subtractingReportingOverflow(UInt64(-delta))
            guard !bad, new <= codec.max else {
                throw BlockError.invalid(file: file.path, field: "refcount of cluster \(c)",
                                         detail: "\(old) \(delta < 0 ? "cannot drop" : "cannot grow") by \(abs(delta)) (\(codec.bits)-bit refcounts)")
            }
            try setLocked(&s, c, new)
            if new == 0 { s.freeHint = min(s.freeHint, c) }
            c += 1
        }
    }

    func change(bytes start: UInt64, length: UInt64, by delta: Int64) throws {
        try state.withLock { try changeLocked(&$0, bytes: start, length: length, by: delta) }
    }

    /// Sets one cluster's refcount (repair), creating its block if needed.
    func set(_ cluster: UInt64, to value: UInt64) throws {
        try state.withLock { s in
            if value > 0 { try ensureBlockLocked(&s, for: cluster) } else if try blockOffset(s, cluster) == nil { return }
            try setLocked(&s, cluster, value)
            if value == 0 { s.freeHint = min(s.freeHint, cluster) }
        }
    }

    // MARK: allocation

    /// Up to `maxClusters` free clusters in a row (at least one), with refcount 1; returns the
    /// first one's host offset, how many, and whether they lie past everything written (so
    /// they read as zeros).
    func allocate(maxClusters: UInt64) throws -> (offset: UInt64, clusters: UInt64, fresh: Bool) {
        try state.withLock { s in
            let hint = s.freeHint
            var c = hint
            while true {
                let bi = c / perBlock
                if bi >= UInt64(table.count) { try growLocked(&s, toCover: bi); continue }
                if table.entry(Int(bi)) == 0 { try ensureBlockLocked(&s, for: c); continue }
                // Past the file's end nothing can be in use: a damaged block claiming otherwise
                // must not make the scan walk its whole range.
                func free(_ c: UInt64) throws -> Bool {
                    guard excluded?(c) != true else { return false }
                    if c >= s.endCluster { return true }
                    return try refcountLocked(&s, c) == 0
                }
                guard try free(c) else { c += 1; continue }
                var n: UInt64 = 1
                let rangeEnd = (bi + 1) * perBlock
                while n < maxClusters, c + n < rangeEnd, try free(c + n) { n += 1 }
                // Free by its refcount but holding a table: the refcounts lie (QEMU: "Preventing
                // invalid allocation"). Refused; nothing is handed out or written.
                try metadata?.guardWrite(c * clusterSize, n * clusterSize, as: "clusters free by their refcount", file: file.path)
                for k in 0..<n { try setLocked(&s, c + k, 1) }
                // The scan stepped only over used clusters; a growth that freed the old table
                // meanwhile lowered the hint, which then stays.
                if s.freeHint == hint { s.freeHint = c + n }
                let fresh = c >= s.endCluster
                extendEnd(&s, to: c + n)
                return (c * clusterSize, n, fresh)
            }
        }
    }

    /// `n` free clusters in a row with refcount 1 (tables that must be contiguous): the first
    /// free run if it is long enough, else fresh space past the file's end, with the refcount
    /// blocks it needs placed just before it (a run longer than one block's range could
    /// otherwise never be found: each new block sits at the start of its own range).
    func allocateRun(_ n: UInt64) throws -> UInt64 {
        let a = try allocate(maxClusters: n)
        if a.clusters >= n { return a.offset }
        try release(a.offset, length: a.clusters * clusterSize)
        return try state.withLock { s in
            let last = (s.endCluster + n + n / perBlock + 2) / perBlock
            if last >= UInt64(table.count) { try growLocked(&s, toCover: last) }
            let start = s.endCluster
            // The blocks missing for [start, start + k + n) go at start: grow k until they fit.
            var missing: [UInt64] = []
            while true {
                let k = UInt64(missing.count)
                let ranges = (start / perBlock) ... ((start + k + n - 1) / perBlock)
                missing = ranges.filter { $0 >= UInt64(table.count) || table.entry(Int($0)) == 0 }
                if UInt64(missing.count) <= k { break }
            }
            if let beyond = missing.last, beyond >= UInt64(table.count) {
                throw BlockError.invalid(file: file.path, field: "refcount table", detail: "cannot cover clusters from \(beyond * perBlock)")
            }
            let k = UInt64(missing.count)
            try metadata?.guardWrite(start * clusterSize, (k + n) * clusterSize, as: "a new table and its refcount blocks", file: file.path)
            for (m, bi) in missing.enumerated() {
                let offset = (start + UInt64(m)) * clusterSize
                blocks.discard(offset, length: clusterSize)
                try file.write([UInt8](repeating: 0, count: Int(clusterSize)), at: offset)
                table.set(Int(bi), offset)
                metadata?.insert(.init(start: offset, length: clusterSize, what: "a refcount block"))
            }
            extendEnd(&s, to: start + k + n)
            for c in start ..< start + k + n { try setLocked(&s, c, 1) }
            return (start + k) * clusterSize
        }
    }

    /// A missing refcount block is created inside the range it covers (that whole range is
    /// free, having no block): at its first usable cluster, counting itself.
    private func ensureBlockLocked(_ s: inout State, for cluster: UInt64) throws {
        let bi = cluster / perBlock
        if bi >= UInt64(table.count) { try growLocked(&s, toCover: bi) }
        guard table.entry(Int(bi)) == 0 else { return }
        var at = bi * perBlock
        while at < (bi + 1) * perBlock && (at == 0 || excluded?(at) == true) { at += 1 }
        guard at < (bi + 1) * perBlock else {
            throw BlockError.invalid(file: file.path, field: "refcount table", detail: "no free cluster for the refcount block of clusters from \(bi * perBlock)")
        }
        let offset = at * clusterSize
        // A range without a refcount block counts as free: it must not hold a table.
        try metadata?.guardWrite(offset, clusterSize, as: "a new refcount block", file: file.path)
        blocks.discard(offset, length: clusterSize)
        try file.write([UInt8](repeating: 0, count: Int(clusterSize)), at: offset)
        table.set(Int(bi), offset)
        metadata?.insert(.init(start: offset, length: clusterSize, what: "a refcount block"))
        extendEnd(&s, to: at + 1)
        try setLocked(&s, at, 1)
    }

    /// Grows the refcount table to cover block `need`: a new area at the start of the first
    /// range the table does not cover holds the refcount blocks for itself and the new table,
    /// which gets every old entry plus the new blocks. The header is switched to it durably,
    /// then the old table's clusters are freed.
    private func growLocked(_ s: inout State, toCover need: UInt64) throws {
        let e = perBlock, perTableCluster = clusterSize / 8
        let first = UInt64(table.count)  // first range the table does not cover
        var j = first
        var k: UInt64 = 1, t: UInt64 = 1, count: UInt64 = 0
        while true {
            count = max(need + 1, j + k, UInt64(table.count) * 2)
            t = (count + perTableCluster - 1) / perTableCluster
            let k2 = (k + t + e - 1) / e
            if k2 <= k {
                // A repair's references may already sit there: move the area past them.
                if let excluded, (j * e ..< j * e + k + t).contains(where: excluded) { j += 1; continue }
                break
            }
            k = k2
        }
        count = t * perTableCluster
        guard t * clusterSize <= QCOW2Header.maxRefcountTableBytes else {
            throw BlockError.io(file: file.path, operation: "grow the refcount table", offset: nil, errno: 27 /* EFBIG */)
        }
        // Everything the new table names must be on disk first.
        try blocks.flush()
        let area = j * e
        try metadata?.guardWrite(area * clusterSize, (k + t) * clusterSize, as: "a new refcount table and its blocks", file: file.path)
        let current = table.all
        var newTable = current + [UInt64](repeating: 0, count: Int(count) - current.count)
        for m in 0..<k {
            var block = [UInt8](repeating: 0, count: Int(clusterSize))
            let rangeStart = (j + m) * e
            for c in max(area, rangeStart) ..< min(area + k + t, rangeStart + e) { codec.set(&block, Int(c - rangeStart), 1) }
            blocks.discard((area + m) * clusterSize, length: clusterSize)
            try file.write(block, at: (area + m) * clusterSize)
            newTable[Int(j + m)] = (area + m) * clusterSize
            metadata?.insert(.init(start: (area + m) * clusterSize, length: clusterSize, what: "a refcount block"))
        }
        var bytes = [UInt8](repeating: 0, count: Int(t * clusterSize))
        for (i, v) in newTable.enumerated() where v != 0 { put64be(&bytes, i * 8, v) }
        let tableOffset = (area + k) * clusterSize
        try file.write(bytes, at: tableOffset)
        try file.sync()
        if QCOW2Driver.testPause > 0 { usleep(QCOW2Driver.testPause) }
        try QCOW2Header.writeField(file, at: QCOW2Header.Field.refcountTableOffset, tableOffset, bytes: 8)
        try QCOW2Header.writeField(file, at: QCOW2Header.Field.refcountTableClusters, t, bytes: 4)
        try file.sync()
        let old = (table.offset, UInt64(current.count) * 8)
        metadata?.remove(start: old.0)
        metadata?.insert(.init(start: tableOffset, length: t * clusterSize, what: "the refcount table"))
        table.move(to: tableOffset, entries: newTable)
        extendEnd(&s, to: area + k + t)
        try changeLocked(&s, bytes: old.0, length: old.1, by: -1)
    }

    // MARK: freeing

    /// Notes host bytes a table no longer points at (the driver reports them through
    /// `takeUnlinked`); `applyFrees` drops their refcounts once that change is durable.
    func deferFree(_ start: UInt64, length: UInt64) {
        state.withLock { $0.pendingFree.append((start, length)) }
    }

    func takePendingFrees() -> [(start: UInt64, length: UInt64)] {
        state.withLock { s in defer { s.pendingFree = [] }; return s.pendingFree }
    }

    /// Drops the refcounts of ranges whose unlinking is durable. `onFreed` runs for each
    /// cluster that reaches 0 before any allocation can see it free (the caller punches it
    /// and forgets it as metadata; it must not take a lock that waits on this one).
    func applyFrees(_ ranges: [(start: UInt64, length: UInt64)], onFreed: (UInt64) throws -> Void) throws {
        try state.withLock { s in
            for r in ranges where r.length > 0 {
                var c = r.start / clusterSize
                while c <= (r.start + r.length - 1) / clusterSize {
                    let old = try refcountLocked(&s, c)
                    guard old > 0 else {
                        throw BlockError.invalid(file: file.path, field: "refcount of cluster \(c)", detail: "0 where a table pointed at it")
                    }
                    if old == 1 { try onFreed(c * clusterSize) }
                    try setLocked(&s, c, old - 1)
                    if old == 1 { s.freeHint = min(s.freeHint, c) }
                    c += 1
                }
            }
        }
    }

    /// Gives back clusters `allocate` handed out that nothing linked.
    func release(_ start: UInt64, length: UInt64) throws {
        try change(bytes: start, length: length, by: -1)
    }

    // MARK: write-back

    /// Writes changed refcount blocks, then (after a barrier) the changed table pieces. Not
    /// durable by itself.
    func writeDirty() throws { try chain.writeChanges() }
}
