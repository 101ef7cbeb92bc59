import Dispatch
import Synchronization

/// One compressed cluster's share of a read buffer (disjoint from every other piece of the
/// same request): what `BlockDevice.read` hands a driver to inflate.
public struct CompressedPiece: @unchecked Sendable {
    public let mapping: Mapping
    /// Guest offset of the piece's first byte.
    public let guestOffset: UInt64
    /// Where the guest bytes go.
    public let piece: UnsafeMutableRawBufferPointer

    public init(mapping: Mapping, guestOffset: UInt64, piece: UnsafeMutableRawBufferPointer) {
        self.mapping = mapping; self.guestOffset = guestOffset; self.piece = piece
    }

    /// Each piece through the driver's one-cluster `readCompressed`, several at once.
    public static func readInParallel(_ pieces: [CompressedPiece], from driver: any ImageMapping) throws {
        try concurrently(pieces.count) { i in
            try driver.readCompressed(pieces[i].mapping, guestOffset: pieces[i].guestOffset, into: pieces[i].piece)
        }
    }

    /// `body(k)` for every k below `count`, several at once (one alone on the calling
    /// thread); the first error is thrown once all are done, so no piece is still being
    /// written after. (Lighter than `onAllCores`: no results are kept.)
    public static func concurrently(_ count: Int, _ body: (Int) throws -> Void) throws {
        if count == 1 { return try body(0) }
        let failure = Mutex<(any Error)?>(nil)
        withoutActuallyEscaping(body) { body in
            nonisolated(unsafe) let body = body  // concurrentPerform returns after every iteration
            DispatchQueue.concurrentPerform(iterations: count) { k in
                do { try body(k) } catch { failure.withLock { if $0 == nil { $0 = error } } }
            }
        }
        if let error = failure.withLock({ $0 }) { throw error }
    }
}
