#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Synchronization

/// The engine: one image driver plus its backing chain, doing all data I/O for every format.
/// Reads walk the driver's mappings and issue one pread per contiguous host run without any
/// lock; allocating writes are serialized per image and write data before the driver links it.
public final class BlockDevice: Sendable {
    public let driver: any ImageDriver
    public let backing: BlockDevice?
    public let virtualSize: UInt64
    public let clusterSize: UInt64
    /// Serializes allocation and link, so two writers never allocate the same cluster. For
    /// drivers that allow it (`ImageDriver.fillsConcurrently`), the data of an allocation is
    /// written outside this lock; the guest clusters it covers are registered here meanwhile,
    /// and only a write or zeroing that touches one of them waits.
    private let allocationLock = Mutex<[InFlight]>([])

    /// Guest clusters `[start, end)` whose new allocation is being filled.
    final class InFlight: @unchecked Sendable {  // fields change under `allocationLock` only
        let start: UInt64, end: UInt64
        var waiters = 0
        let done = DispatchSemaphore(value: 0)
        init(start: UInt64, end: UInt64) { self.start = start; self.end = end }
    }

    /// Guest writes and zeroings finished (or failed) so far: what was computed from the
    /// allocation before this moved may be stale.
    private let changes = Atomic<UInt64>(0)
    public var changeCount: UInt64 { changes.load(ordering: .acquiring) }

    /// Host ranges commits and zeroing unlinked, waiting for a flush before `release`.
    private let unlinked = Mutex<[HostRange]>([])

    /// Reads and writes in progress, by the parity of the epoch they started in. Both map a
    /// cluster and then do their I/O without a lock; space a flush is about to release may
    /// be such a cluster (a discard unlinked it meanwhile), so the release first waits for
    /// every access that began before it. Otherwise a reader could return, or a writer
    /// overwrite, the bytes of the next owner of that space.
    private let accessEpoch = Atomic<Int>(0)
    private let accessesEven = Atomic<Int>(0), accessesOdd = Atomic<Int>(0)

    private func accesses(_ epoch: Int) -> Int { epoch & 1 == 0 ? accessesEven.load(ordering: .acquiring) : accessesOdd.load(ordering: .acquiring) }
    private func count(_ epoch: Int, _ delta: Int) {
        if epoch & 1 == 0 { accessesEven.add(delta, ordering: .sequentiallyConsistent) } else { accessesOdd.add(delta, ordering: .sequentiallyConsistent) }
    }

    private func enterAccess() -> Int {
        while true {
            let e = accessEpoch.load(ordering: .sequentiallyConsistent)
            count(e, 1)
            // Counted in `e` only if the epoch did not move meanwhile (else the release may
            // not have seen us): then this access maps after the flip, and sees the unlinks.
            if accessEpoch.load(ordering: .sequentiallyConsistent) == e { return e }
            count(e, -1)
        }
    }

    private func leaveAccess(_ epoch: Int) { count(epoch, -1) }

    /// Waits until every read and write that started before now has finished (one waiter
    /// at a time, so a second flip never makes the first wait for accesses that started later).
    private let epochFlip = Mutex<Void>(())
    private func waitForEarlierAccesses() {
        epochFlip.withLock { _ in
            let old = accessEpoch.add(1, ordering: .sequentiallyConsistent).oldValue
            while accesses(old) > 0 { usleep(50) }
        }
    }

    /// Tests only: called by `read` between its mapping and its I/O, so a test can hold a
    /// reader exactly where a discard and a flush could overtake it.
    nonisolated(unsafe) static var testHookAfterReadMap: (@Sendable (BlockDevice) -> Void)?
    /// Tests only: called by `write` between mapping a cluster in place and writing it.
    nonisolated(unsafe) static var testHookAfterWriteMap: (@Sendable (BlockDevice) -> Void)?

    /// The first failure of a flush or write-back (or of a write already acknowledged):
    /// after it every later write, zeroing and flush fails with it, until the image is
    /// opened again. After a failed fdatasync Linux may have dropped the dirty pages, so a
    /// later success would prove nothing (QEMU's file driver does the same). Space waiting
    /// for release is never released after it: at worst it leaks, it is never freed twice.
    private let failure = Mutex<(any Error)?>(nil)
    private let failed = Atomic<Bool>(false)

    /// Puts the device in the failed state (keeps the first error).
    public func markFailed(_ error: any Error) {
        failure.withLock { if $0 == nil { $0 = error } }
        failed.store(true, ordering: .releasing)
    }

    /// The error that put the device in the failed state, if any.
    public var failedError: (any Error)? { failed.load(ordering: .acquiring) ? failure.withLock { $0 } : nil }

    @inline(__always)
    private func checkNotFailed() throws {
        guard failed.load(ordering: .acquiring), let error = failure.withLock({ $0 }) else { return }
        throw BlockError.earlierFailure(file: driver.file.path, detail: "\(error)")
    }

    /// With the allocation lock held, right after a commit or zeroRange.
    private func collectUnlinked() {
        let u = writer?.takeUnlinked() ?? []
        if !u.isEmpty { unlinked.withLock { $0 += u } }
    }

    public init(driver: any ImageDriver, backing: BlockDevice? = nil) {
        self.driver = driver
        self.writer = driver.writer
        self.backing = backing
        self.virtualSize = driver.info.virtualSize
        self.clusterSize = max(driver.info.clusterSize, 512)
    }

    /// The driver's allocating role when this image takes writes (nil: read-only).
    public let writer: (any ImageAllocating)?
    public var isWritable: Bool { writer != nil }

    private func allocating() throws -> any ImageAllocating {
        guard let writer else { throw BlockError.readOnly(file: driver.file.path) }
        return writer
    }

    /// Every file whose bytes this disk shows: each image of the chain and its extents.
    public var contributingFiles: [ImageFile] { driver.contributingFiles + (backing?.contributingFiles ?? []) }

    // MARK: read

    /// Fills `buffer` with guest bytes from `offset`; bytes past the virtual size read as zeros.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        let epoch = enterAccess()
        defer { leaveAccess(epoch) }
        let total = UInt64(buffer.count)
        let inside = offset >= virtualSize ? 0 : min(total, virtualSize - offset)
        if inside < total { memset(base + Int(inside), 0, Int(total - inside)) }
        var pos: UInt64 = 0
        // A pending contiguous host run, so adjacent data mappings cost one pread.
        var runHost: UInt64 = 0, runGuest: UInt64 = 0, runLen: UInt64 = 0
        // Compressed clusters of this request, inflated together at the end.
        var compressed: [CompressedPiece] = []
        func issueRun() throws {
            if runLen > 0 {
                let (file, at) = driver.resolve(host: runHost)
                try file.readZeroFilled(into: UnsafeMutableRawBufferPointer(start: base + Int(runGuest), count: Int(runLen)), at: at)
                runLen = 0
            }
        }
        while pos < inside {
            let m = try driver.map(offset + pos, maxLength: inside - pos)
            let n = min(max(m.length, 1), inside - pos)
            let piece = UnsafeMutableRawBufferPointer(start: base + Int(pos), count: Int(n))
            switch m {
            case let .data(host, _), let .shared(host, _):
                if runLen > 0 && runHost + runLen == host && runGuest + runLen == pos {
                    runLen += n
                } else {
                    try issueRun()
                    runHost = host; runGuest = pos; runLen = n
                }
            case .zero:
                try issueRun()
                memset(piece.baseAddress!, 0, piece.count)
            case .unallocated:
                try issueRun()
                try readBacking(into: piece, at: offset + pos)
            case .compressed:
                try issueRun()
                compressed.append(CompressedPiece(mapping: m, guestOffset: offset + pos, piece: piece))
            }
            pos += n
        }
        if let hook = Self.testHookAfterReadMap { hook(self) }
        try issueRun()
        try inflate(compressed)
    }

    /// Inflates the compressed clusters of one request: the driver reads a batch its own way
    /// (`ImageMapping.readCompressed(_:)`, by default several at once).
    private func inflate(_ pieces: [CompressedPiece]) throws {
        if pieces.count == 1 { try driver.readCompressed(pieces[0].mapping, guestOffset: pieces[0].guestOffset, into: pieces[0].piece) }
        else if pieces.count > 1 { try driver.readCompressed(pieces) }
    }

    /// Serves a read of a read-only disk without copying its bytes when the driver lends
    /// every one of them (`ImageMapping.lend`): `reply` gets the regions while they hold.
    /// False: nothing was done, read the bytes.
    public func lend(at offset: UInt64, count: Int, _ reply: ([UnsafeRawBufferPointer]) -> Void) -> Bool {
        // Not counted as an access: a disk that never writes never unlinks space, so no
        // release waits for it (and a read-only mount of any format asks here first).
        guard writer == nil, backing == nil, count > 0, offset < virtualSize, UInt64(count) <= virtualSize - offset else { return false }
        guard let regions = driver.lend(offset, count: count) else { return false }
        reply(regions)
        return true
    }

    private func readBacking(into piece: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        if let backing { try backing.read(into: piece, at: offset) } // zeros past its end
        else { memset(piece.baseAddress!, 0, piece.count) }
    }

    // MARK: write

    /// Whether the driver would refuse this write (see `ImageDriver.checkWrite`), so a caller
    /// that acknowledges before writing can refuse it up front.
    public func checkWrite(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try writer?.checkWrite(data, at: offset)
    }

    /// The same check for zeroing (PUNCH_HOLE, ZERO_RANGE): it changes guest bytes as a write
    /// of zeros does, so it must not turn the first sector into a header either. Every path
    /// that changes guest bytes comes through `write` or `zero`, and both ask here.
    public func checkZeroing(at offset: UInt64, length: UInt64) throws {
        guard length > 0, offset < Self.guardedPrefix else { return }
        let n = Int(min(length, Self.guardedPrefix - offset))
        try [UInt8](repeating: 0, count: n).withUnsafeBytes { try writer?.checkWrite($0, at: offset) }
    }

    /// Bytes at the start of the disk whose changes drivers may refuse (a probed raw image's
    /// first sector); zeroing elsewhere needs no check.
    static let guardedPrefix: UInt64 = 4096

    /// Writes guest bytes; the disk never grows, so a write past the end fails.
    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard isWritable else { throw BlockError.readOnly(file: driver.file.path) }
        try checkNotFailed()
        try checkNotCorrupt()
        try writer?.checkWrite(data, at: offset)
        let total = UInt64(data.count)
        guard offset <= virtualSize, total <= virtualSize - offset else {
            throw BlockError.outOfRange(offset: offset, length: total, size: virtualSize)
        }
        let epoch = enterAccess()
        defer { leaveAccess(epoch); changes.add(1, ordering: .releasing) }
        do { try writeMapped(data, at: offset, total: total) } catch {
            noteCorruption(error)
            throw error
        }
    }

    private func writeMapped(_ data: UnsafeRawBufferPointer, at offset: UInt64, total: UInt64) throws {
        var pos: UInt64 = 0
        var announced = false
        while pos < total {
            let m = try driver.map(offset + pos, maxLength: total - pos)
            // After the first mapping: a write refused for a damaged table changes nothing
            // (VMDK would otherwise already have a new CID).
            if !announced { try allocating().willWrite(); writer?.noteGuestChange(offset, length: total); announced = true }
            let n = min(max(m.length, 1), total - pos)
            if case let .data(host, _) = m {
                if let hook = Self.testHookAfterWriteMap { hook(self) }
                try writeHost(UnsafeRawBufferPointer(rebasing: data[Int(pos)..<Int(pos + n)]), at: host)
                pos += n
            } else {
                pos += try allocatingWrite(data, dataOffset: pos, guestOffset: offset + pos, length: n)
            }
        }
    }

    /// Allocates clusters for a non-data range, fills them (backing or zeros around the
    /// request), writes them, then lets the driver link them. Returns bytes consumed.
    private func allocatingWrite(_ data: UnsafeRawBufferPointer, dataOffset: UInt64,
                                 guestOffset: UInt64, length: UInt64) throws -> UInt64 {
        guard (writer?.fillsConcurrently ?? false) else {
            return try allocationLock.withLock { _ in
                // Another writer may have allocated it while we waited.
                let m = try driver.map(guestOffset, maxLength: length)
                let n = min(max(m.length, 1), length)
                if case let .data(host, _) = m {
                    try writeHost(UnsafeRawBufferPointer(rebasing: data[Int(dataOffset)..<Int(dataOffset + n)]), at: host)
                    return n
                }
                let a = try allocating().allocate(guestOffset, length: n)
                precondition(a.guestOffset <= guestOffset && a.guestOffset + a.length > guestOffset, "driver allocation misses the request")
                try guardAllocation(a)
                do { return try fillAndCommit(a, data, dataOffset: dataOffset, guestOffset: guestOffset, length: n, like: m) } catch {
                    if !committed(a) { writer?.abandon(a) }
                    throw error
                }
            }
        }
        enum Step { case inPlace(UInt64, UInt64), fill(Allocation, Mapping, UInt64, InFlight), wait(InFlight) }
        while true {
            let step: Step = try allocationLock.withLock { inFlight in
                let m = try driver.map(guestOffset, maxLength: length)
                let n = min(max(m.length, 1), length)
                if case let .data(host, _) = m { return .inPlace(host, n) }
                if let busy = Self.busy(&inFlight, guestOffset, n, clusterSize) { return .wait(busy) }
                let a = try allocating().allocate(guestOffset, length: n)
                precondition(a.guestOffset <= guestOffset && a.guestOffset + a.length > guestOffset, "driver allocation misses the request")
                try guardAllocation(a)
                let busy = InFlight(start: a.guestOffset.alignedDown(clusterSize), end: (a.guestOffset + a.length).alignedUp(clusterSize))
                inFlight.append(busy)
                return .fill(a, m, n, busy)
            }
            switch step {
            case let .wait(busy):
                busy.done.wait()  // the overlapping allocation is linked; map again
            case let .inPlace(host, n):
                try writeHost(UnsafeRawBufferPointer(rebasing: data[Int(dataOffset)..<Int(dataOffset + n)]), at: host)
                return n
            case let .fill(a, m, n, busy):
                defer {
                    allocationLock.withLock { inFlight in
                        inFlight.removeAll { $0 === busy }
                        for _ in 0..<busy.waiters { busy.done.signal() }
                    }
                }
                do {
                    return try fillAndCommit(a, data, dataOffset: dataOffset, guestOffset: guestOffset, length: n, like: m) { a in
                        try self.allocationLock.withLock { _ in
                            defer { self.collectUnlinked() }
                            try self.allocating().commit(a)
                        }
                    }
                } catch {
                    allocationLock.withLock { _ in if !committed(a) { writer?.abandon(a) } }
                    throw error
                }
            }
        }
    }

    /// With the allocation lock held: the fill that `[offset, offset+length)` must wait for
    /// (it touches a cluster being filled), counted as waited on; nil if none.
    private static func busy(_ inFlight: inout [InFlight], _ offset: UInt64, _ length: UInt64, _ clusterSize: UInt64) -> InFlight? {
        let start = offset.alignedDown(clusterSize), end = (offset + length).alignedUp(clusterSize)
        guard let busy = inFlight.first(where: { $0.start < end && start < $0.end }) else { return nil }
        busy.waiters += 1
        return busy
    }

    /// A new allocation must not lie on the image's metadata (a refcount or table that says
    /// "free" about a table): nothing is written or given back, the caller gets EIO.
    private func guardAllocation(_ a: Allocation) throws {
        if let m = writer?.metadataOverlap(host: a.hostOffset, length: a.length) {
            throw BlockError.metadataOverlap(file: driver.file.path,
                                             detail: "new clusters for guest offset \(a.guestOffset) at host \(a.hostOffset) (\(a.length) bytes) would overwrite \(m.what) at \(m.start)")
        }
    }

    /// After a refused write on metadata: the image is marked corrupt (where the format can
    /// say so) and the device takes no more writes; what was written before can still be
    /// flushed.
    private func noteCorruption(_ error: any Error) {
        guard let e = error as? BlockError, case .metadataOverlap = e else { return }
        let first = corruption.withLock { c -> Bool in
            guard c == nil else { return false }
            c = e
            return true
        }
        corrupt.store(true, ordering: .releasing)
        if first { writer?.signalCorruption(e) }
    }
    private let corrupt = Atomic<Bool>(false)
    private let corruption = Mutex<BlockError?>(nil)

    @inline(__always)
    private func checkNotCorrupt() throws {
        guard corrupt.load(ordering: .acquiring), let e = corruption.withLock({ $0 }) else { return }
        throw e
    }

    /// Whether the driver linked `a` (a commit that failed half way may have).
    private func committed(_ a: Allocation) -> Bool {
        guard case let .data(host, _)? = try? driver.map(a.guestOffset, maxLength: a.length) else { return false }
        return host == a.hostOffset
    }

    /// `link` commits the filled run (the caller may take a lock for it).
    private func fillAndCommit(_ a: Allocation, _ data: UnsafeRawBufferPointer, dataOffset: UInt64, guestOffset: UInt64,
                               length n: UInt64, like m: Mapping, link: ((Allocation) throws -> Void)? = nil) throws -> UInt64 {
        let commit = link ?? { a in
            defer { self.collectUnlinked() }  // (the caller holds the allocation lock)
            try self.allocating().commit(a)
        }
        let take = min(n, a.guestOffset + a.length - guestOffset)
        if a.guestOffset == guestOffset && take == a.length {
            // Whole clusters: no fill needed, write straight from the caller's buffer.
            try writeHost(UnsafeRawBufferPointer(rebasing: data[Int(dataOffset)..<Int(dataOffset + take)]), at: a.hostOffset)
            try commit(a)
            return take
        }
        let head = guestOffset - a.guestOffset
        let tailStart = head + take
        if a.fresh && !a.mixed && fillIsZeros(m) {
            // Fresh host space already reads as zeros: write only the guest's bytes, and
            // (when they stop short of the run's end) extend the file over the whole run
            // so it ends where the allocator thinks.
            try writeHost(UnsafeRawBufferPointer(rebasing: data[Int(dataOffset)..<Int(dataOffset + take)]), at: a.hostOffset + head)
            if tailStart < a.length {
                // The file must reach the run's end; a zero byte there never shrinks it (a
                // truncate could, under a fill of a later run running at the same time).
                let (file, at) = driver.resolve(host: a.hostOffset)
                try file.extend(to: at + a.length)
            }
            try commit(a)
            return take
        }
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(a.length), alignment: 4096)
        defer { buf.deallocate() }
        // Fill what the request does not cover with what the guest sees there now.
        let like: Mapping = a.mixed ? .unallocated(length: 0) : m
        if head > 0 { try fill(UnsafeMutableRawBufferPointer(rebasing: buf[0..<Int(head)]), at: a.guestOffset, like: like) }
        if tailStart < a.length {
            try fill(UnsafeMutableRawBufferPointer(rebasing: buf[Int(tailStart)...]), at: a.guestOffset + tailStart, like: like)
        }
        UnsafeMutableRawBufferPointer(rebasing: buf[Int(head)..<Int(tailStart)])
            .copyMemory(from: UnsafeRawBufferPointer(rebasing: data[Int(dataOffset)..<Int(dataOffset + take)]))
        try writeHost(UnsafeRawBufferPointer(buf), at: a.hostOffset)
        try commit(a)
        return take
    }

    @inline(__always)
    private func writeHost(_ bytes: UnsafeRawBufferPointer, at host: UInt64) throws {
        let (file, at) = driver.resolve(host: host)
        try file.write(bytes, at: at)
    }

    /// Whether what the guest sees around a write into mapping `m` is zeros.
    private func fillIsZeros(_ m: Mapping) -> Bool {
        switch m {
        case .zero: return true
        case .unallocated: return backing == nil
        default: return false
        }
    }

    /// Old contents of a range that is being allocated: zeros for zero clusters, the backing
    /// image for unallocated ones; anything else re-reads through the normal path.
    private func fill(_ piece: UnsafeMutableRawBufferPointer, at offset: UInt64, like m: Mapping) throws {
        let end = min(offset + UInt64(piece.count), virtualSize)
        if offset >= end { memset(piece.baseAddress!, 0, piece.count); return }
        if case .zero = m { memset(piece.baseAddress!, 0, piece.count); return }
        try read(into: piece, at: offset) // unallocated -> backing/zeros; beyond disk -> zeros
    }

    // MARK: zeroing

    /// PUNCH_HOLE / ZERO_RANGE: afterwards the range reads as zeros, or this throws.
    /// `fast`: only what the format zeroes in its metadata (NBD's FAST_ZERO); where zeros
    /// would have to be written it throws `.unsupported` (EOPNOTSUPP) and the caller writes
    /// them itself. What was zeroed before that stays zeroed, which the caller's fallback
    /// rewrites anyway.
    public func zero(at offset: UInt64, length: UInt64, deallocate: Bool, fast: Bool = false) throws {
        guard isWritable else { throw BlockError.readOnly(file: driver.file.path) }
        guard offset <= virtualSize, length <= virtualSize - offset else {
            throw BlockError.outOfRange(offset: offset, length: length, size: virtualSize)
        }
        try checkNotFailed()
        try checkNotCorrupt()
        try checkZeroing(at: offset, length: length)
        defer { changes.add(1, ordering: .releasing) }
        do { try zeroMapped(at: offset, length: length, deallocate: deallocate, fast: fast) } catch {
            noteCorruption(error)
            throw error
        }
    }

    private func zeroMapped(at offset: UInt64, length: UInt64, deallocate: Bool, fast: Bool) throws {
        try allocating().willWrite()
        writer?.noteGuestChange(offset, length: length)
        let end = offset + length
        try metadataSteps(offset, end, { try $0.zeroRange($1, length: $2, deallocate: deallocate) }) { pos, done in
            // The driver handles nothing at `pos` (partial cluster): write zeros up to what it can take.
            if fast { throw BlockError.unsupported(file: self.driver.file.path, feature: "fast zeroing of \(end - pos) bytes at \(pos)") }
            let stop = done.length > 0 ? done.offset : pos + RangeWalk.toClusterEnd(pos, clusterSize: self.clusterSize, maxLength: end - pos)
            try self.writeZeros(at: pos, length: stop - pos)
            return stop
        }
    }

    /// Runs a metadata-only driver operation (zeroing, unallocating) over `[offset, end)` in
    /// the steps the driver takes, each under the allocation lock and after any fill in
    /// flight there is linked; what it unlinks is collected for release after a flush.
    /// `partial` handles a position the driver does nothing at and returns where to go on.
    private func metadataSteps(_ offset: UInt64, _ end: UInt64,
                               _ step: (any ImageAllocating, _ at: UInt64, _ length: UInt64) throws -> (offset: UInt64, length: UInt64),
                               partial: (_ at: UInt64, _ done: (offset: UInt64, length: UInt64)) throws -> UInt64) throws {
        var pos = offset
        while pos < end {
            let (busy, done) = try allocationLock.withLock { inFlight -> (InFlight?, (offset: UInt64, length: UInt64)) in
                if let busy = Self.busy(&inFlight, pos, end - pos, clusterSize) { return (busy, (pos, 0)) }
                defer { collectUnlinked() }
                return (nil, try step(allocating(), pos, end - pos))
            }
            if let busy { busy.done.wait(); continue }  // a fill there is being linked first
            if done.length > 0 && done.offset == pos { pos += done.length; continue }
            pos = try partial(pos, done)
        }
    }

    /// Makes the whole range read from the backing file again (`commit` empties the image it
    /// committed into its backing file), freeing what it held once that is durable; throws
    /// `unsupported` when the format cannot drop a part of it.
    public func unallocate(at offset: UInt64, length: UInt64) throws {
        guard isWritable else { throw BlockError.readOnly(file: driver.file.path) }
        guard offset <= virtualSize, length <= virtualSize - offset else {
            throw BlockError.outOfRange(offset: offset, length: length, size: virtualSize)
        }
        try checkNotFailed()
        try checkNotCorrupt()
        defer { changes.add(1, ordering: .releasing) }
        try allocating().willWrite()
        writer?.noteGuestChange(offset, length: length)
        let end = offset + length
        try metadataSteps(offset, end, { try $0.unallocate($1, length: $2) }) { pos, _ in
            throw BlockError.unsupported(file: self.driver.file.path, feature: "dropping \(end - pos) bytes at \(pos) back to the backing file")
        }
    }

    /// Writes zeros only where the range does not already read as zeros.
    private func writeZeros(at offset: UInt64, length: UInt64) throws {
        var pos = offset
        let end = offset + length
        let chunk = min(length, 1 << 20)
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(chunk), alignment: 4096)
        defer { zeros.deallocate() }
        memset(zeros.baseAddress!, 0, zeros.count)
        while pos < end {
            let m = try driver.map(pos, maxLength: min(end - pos, chunk))
            let n = min(max(m.length, 1), end - pos, chunk)
            let alreadyZero: Bool
            switch m {
            case .zero: alreadyZero = true
            case .unallocated: alreadyZero = backing == nil
            default: alreadyZero = false
            }
            if !alreadyZero { try write(UnsafeRawBufferPointer(rebasing: zeros[0..<Int(n)]), at: pos) }
            pos += n
        }
    }

    // MARK: status

    /// Whether guest bytes from `offset` are data (here or in the backing chain) and for how long.
    public func status(_ offset: UInt64, maxLength: UInt64) throws -> (data: Bool, length: UInt64) {
        let m = try driver.status(offset, maxLength: maxLength)
        let n = min(max(m.length, 1), maxLength)
        switch m {
        case .data, .shared, .compressed: return (true, n)
        case .zero: return (false, n)
        case .unallocated:
            guard let backing, offset < backing.virtualSize else { return (false, n) }
            let b = try backing.status(offset, maxLength: min(n, backing.virtualSize - offset))
            return (b.data, b.length)
        }
    }

    /// SEEK_DATA (`data: true`) or SEEK_HOLE from `offset`; nil when no data follows
    /// (ENXIO). The end of the disk counts as a hole. A walk that runs out of `budget` answers
    /// as if the rest were data (data here for SEEK_DATA, no hole before the end for
    /// SEEK_HOLE), which lseek allows and every reader handles.
    /// `end` stops the walk early (a partition's end): the answer is then as if the disk
    /// ended there.
    public func seek(from offset: UInt64, data: Bool, end: UInt64? = nil, budget: WorkBudget = .seek) throws -> UInt64? {
        let end = min(end ?? virtualSize, virtualSize)
        guard offset < end else { return nil }
        var budget = budget
        var pos = offset
        while pos < end {
            guard budget.spend() else { return data ? pos : end }
            let s = try status(pos, maxLength: end - pos)
            if s.data == data { return pos }
            pos += s.length
        }
        return data ? nil : end
    }

    /// Guest bytes that hold data in this image (for st_blocks); nil when the walk runs out
    /// of `budget` (callers then estimate from the host file).
    /// `parallel`: a large disk is walked in parts on all cores (for a report someone waits
    /// for; a mount's background count walks on one, so guest requests keep the others).
    public func allocatedBytes(budget: WorkBudget = .report, parallel: Bool = false) throws -> UInt64? {
        try allocatedBytes(from: 0, to: virtualSize, budget: budget, parallel: parallel)
    }

    /// Guest bytes allocated in `[from, to)` (a partition's), nil past the budget.
    public func allocatedBytes(from: UInt64, to: UInt64, budget: WorkBudget, parallel: Bool = false) throws -> UInt64? {
        let to = min(to, virtualSize)
        guard from < to else { return 0 }
        // In parts (a split VMDK's thousands of extents, a VDI's block map); each part has the
        // whole budget, the deadline bounds them all.
        let parts = parallel && to - from >= Self.parallelWalkBytes ? Self.walkParts : 1
        let step = ((to - from) / UInt64(parts)).alignedUp(1 << 20)
        let results = onAllCores(parts) { k in
            let start = min(to, from + UInt64(k) * step), end = min(to, start + step)
            return try walkAllocated(from: start, to: end, budget: budget)
        }
        var total: UInt64 = 0
        for r in results {
            guard let n = try r.get() else { return nil }
            total += n
        }
        return total
    }

    /// Disks at least this large are walked in `walkParts` parts at once.
    static let parallelWalkBytes: UInt64 = 64 << 30
    static let walkParts = 8

    private func walkAllocated(from start: UInt64, to end: UInt64, budget: WorkBudget) throws -> UInt64? {
        var budget = budget
        if let counting = driver as? any AllocationCounting {
            return try counting.countAllocated(from: start, to: end, budget: &budget)
        }
        return try driver.countByStatus(from: start, to: end, budget: &budget)
    }

    /// What st_blocks shows when the walk is too long: the host file's allocation, at most
    /// the disk's size.
    public func estimatedAllocatedBytes() -> UInt64 {
        min(driver.hostAllocatedBytes, virtualSize)
    }

    // MARK: lifecycle

    /// Writes back and makes durable everything written so far; then space unlinked before
    /// this flush is released (and that release is made durable too). Any failure puts the
    /// device in the failed state (`markFailed`): the batch is not put back, since part of
    /// it may be released already and a later flush would free it a second time.
    public func flush() throws {
        guard isWritable else { return }
        try checkNotFailed()
        let batch = unlinked.withLock { u in defer { u = [] }; return u }
        do {
            try driver.flush()
            if !batch.isEmpty {
                waitForEarlierAccesses()
                try allocating().release(batch)
                try driver.flush()
            }
        } catch {
            markFailed(error)
            throw error
        }
    }

    /// The periodic write-back (`ImageDriver.writeBack`); a full flush when space waits to
    /// be released, since only a durable unlink may free it.
    public func writeBack() throws {
        guard isWritable else { return }
        try checkNotFailed()
        if unlinked.withLock({ !$0.isEmpty }) { try flush(); return }
        do { try driver.writeBack() } catch {
            markFailed(error)
            throw error
        }
    }

    /// Closes the whole chain, top first.
    /// After a failure (`markFailed`) nothing more is written: the image keeps the marks a
    /// crash would leave (qcow2 dirty bit, QED NEED_CHECK), so its next writable open
    /// repairs it, and this throws the failure for `unmount` to report.
    public func close() throws {
        if isWritable, let error = failedError {
            try? backing?.close()
            throw BlockError.earlierFailure(file: driver.file.path, detail: "\(error)")
        }
        if isWritable && unlinked.withLock({ !$0.isEmpty }) { try flush() }
        try driver.close()
        try backing?.close()
    }
}
