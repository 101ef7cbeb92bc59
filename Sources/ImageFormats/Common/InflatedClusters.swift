import Synchronization

/// Recently inflated compressed clusters (VMDK streamOptimized grains, qcow2 compressed
/// clusters), keyed by host offset, so small reads in one cluster do not inflate it again
/// and again. Bounded to about `budget` bytes; the oldest entry goes first.
///
/// A first small read inflates only up to the bytes it needs (on average half a cluster
/// for random reads, which are bound by inflating); a second read that needs more
/// inflates the whole cluster.
///
/// Every cache of the process also shares one global budget (`processBudget`): a chain of
/// many compressed images, or many extents, cannot add up their budgets.
final class InflatedClusters: Sendable {
    private let state = Mutex<(items: [UInt64: [UInt8]], order: [UInt64])>(([:], []))
    private let capacity: Int
    private let clusterBytes: Int

    /// Bytes all caches of the process may hold together.
    static let processBudget = 64 << 20
    private static let processBytes = Atomic<Int>(0)
    /// What all caches hold now.
    static var heldBytes: Int { processBytes.load(ordering: .relaxed) }

    init(clusterBytes: Int, budget: Int = 8 << 20) {
        self.clusterBytes = clusterBytes
        capacity = min(1024, max(2, budget / max(clusterBytes, 1)))
    }

    deinit {
        let held = state.withLock { $0.items.values.reduce(0) { $0 + $1.count } }
        Self.processBytes.subtract(held, ordering: .relaxed)
    }

    /// At least the first `need` bytes of the cluster at `key`; `inflate(limit)` must return
    /// exactly the first `limit` bytes of the cluster.
    func cluster(at key: UInt64, need: Int, inflate: (_ limit: Int) throws -> [UInt8]) throws -> [UInt8] {
        let cached = state.withLock { $0.items[key] }
        if let cached, cached.count >= need { return cached }
        // Seen before, or most of it wanted: inflate it all.
        let limit = cached != nil || need > clusterBytes / 2 ? clusterBytes : need
        let bytes = try inflate(limit)
        state.withLock { c in
            if c.items[key] == nil { c.order.append(key) }
            let old = c.items[key]?.count ?? 0
            if old < bytes.count {
                c.items[key] = bytes
                Self.processBytes.add(bytes.count - old, ordering: .relaxed)
            }
            // Over this cache's count or the process budget: drop the oldest first (under the
            // process budget even the newest goes: the caller still gets its bytes).
            while c.order.count > capacity || (!c.order.isEmpty && Self.processBytes.load(ordering: .relaxed) > Self.processBudget) {
                let gone = c.items.removeValue(forKey: c.order.removeFirst())?.count ?? 0
                Self.processBytes.subtract(gone, ordering: .relaxed)
            }
        }
        return bytes
    }
}
