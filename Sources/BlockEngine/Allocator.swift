import Synchronization

/// End-of-file bump allocation in aligned units, serialized under one lock per image.
/// Formats with their own free-space rules (qcow2 refcounts) keep their own policy and use
/// this only to grow the file.
public final class Allocator: Sendable {
    private let state: Mutex<UInt64>
    public let alignment: UInt64
    /// Highest host offset a format can address (e.g. 32-bit sector numbers); nil for none.
    public let limit: UInt64?
    public let file: String
    /// Reserves host space ahead of the frontier (writable images only).
    private let preallocator: Preallocator?

    /// `nextOffset` is rounded up to `alignment` (a power of two). With `preallocating`, host
    /// space is reserved ahead of the frontier in that file when it is writable.
    public init(file: String, nextOffset: UInt64, alignment: UInt64, limit: UInt64? = nil,
                preallocating host: ImageFile? = nil) {
        precondition(alignment.isPowerOfTwo)
        self.alignment = alignment
        self.limit = limit
        self.file = file
        self.preallocator = host.flatMap { $0.isWritable ? Preallocator(file: $0) : nil }
        self.state = Mutex(nextOffset.alignedUp(alignment))
    }

    /// Reserves `bytes` (rounded up to the alignment) and returns where they start.
    public func allocate(_ bytes: UInt64) throws -> UInt64 {
        let size = bytes.alignedUp(alignment)
        let start = try state.withLock { next in
            let (end, overflow) = next.addingReportingOverflow(size)
            if overflow || (limit.map { end > $0 } ?? false) {
                throw BlockError.io(file: file, operation: "allocate", offset: next, errno: 27 /* EFBIG */)
            }
            let start = next
            next = end
            return start
        }
        preallocator?.reached(start + size)
        return start
    }

    /// Takes back the last allocation (`start`, `bytes`) when nothing will link it (its data
    /// write failed); true if it was the last one and the frontier moved back. `clear` must
    /// remove what the failed write may have left there (truncate the file to `start`), so
    /// that the space reads as zeros when it is handed out again as fresh; if it fails, the
    /// frontier stays where it is and the space is leaked instead.
    @discardableResult
    public func giveBack(_ start: UInt64, _ bytes: UInt64, clear: () -> Bool) -> Bool {
        state.withLock { next in
            guard start + bytes.alignedUp(alignment) == next, clear() else { return false }
            next = start
            return true
        }
    }

    /// Waits for pending reservations (tests).
    func settle() { preallocator?.settle() }

    /// Returns unused reserved host space; call on close, after the last allocation.
    public func release() { preallocator?.release() }

    /// The next offset that will be handed out (the logical end of the image).
    public var end: UInt64 { state.withLock { $0 } }
}
