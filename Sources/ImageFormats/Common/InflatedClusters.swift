import Synchronization

/// Recently inflated compressed clusters (VMDK streamOptimized grains, qcow2 compressed
/// clusters), keyed by host offset, so small reads in one cluster do not inflate it again
/// and again. Bounded to about `budget` bytes; the oldest entry goes first.
///
/// A first small read inflates only up to the bytes it needs (on average half a cluster
/// for random reads, which are bound by inflating); a second read that needs more
/// inflates the whole cluster.
final class InflatedClusters: Sendable {
    private let state = Mutex<(items: [UInt64: [UInt8]], order: [UInt64])>(([:], []))
    private let capacity: Int
    private let clusterBytes: Int

    init(clusterBytes: Int, budget: Int = 8 << 20) {
        self.clusterBytes = clusterBytes
        capacity = min(1024, max(4, budget / max(clusterBytes, 1)))
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
            if (c.items[key]?.count ?? 0) < bytes.count { c.items[key] = bytes }
            if c.order.count > capacity { c.items[c.order.removeFirst()] = nil }
        }
        return bytes
    }
}
