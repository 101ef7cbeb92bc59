import Synchronization

/// A fixed-size set of bits that are only ever set, read and set without a lock (EWF's
/// "chunk checked this mount" marks, asked on every read by every FUSE thread: a locked
/// bitmap there was the most contended lock of 4K random reads).
public final class AtomicBits: @unchecked Sendable { // the words are only touched atomically
    public let count: UInt64
    private let words: UnsafeMutablePointer<Atomic<UInt64>>
    private let wordCount: Int

    public init(count: UInt64) {
        self.count = count
        wordCount = Int((count + 63) / 64)
        words = .allocate(capacity: max(wordCount, 1))
        for i in 0..<wordCount { (words + i).initialize(to: Atomic(0)) }
    }

    deinit {
        words.deinitialize(count: wordCount)
        words.deallocate()
    }

    /// Whether bit `i` is set (false past `count`).
    public func contains(_ i: UInt64) -> Bool {
        guard i < count else { return false }
        return words[Int(i / 64)].load(ordering: .acquiring) & (1 << (i % 64)) != 0
    }

    /// Sets bit `i` (nothing past `count`).
    public func insert(_ i: UInt64) {
        guard i < count else { return }
        words[Int(i / 64)].bitwiseOr(1 << (i % 64), ordering: .releasing)
    }
}
