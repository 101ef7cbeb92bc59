import Synchronization

/// Recently inflated compressed clusters (VMDK streamOptimized grains, qcow2 compressed
/// clusters), keyed by host offset, so small reads in one cluster do not inflate it again
/// and again. Bounded to about `budget` bytes; the oldest entry goes first.
///
/// A first small read asks only for the bytes it needs (zlib then stops there, on average
/// half a cluster for random reads); libdeflate's one-pass inflate, when it applies, gives
/// the whole cluster for less. A second read that needs more inflates the whole cluster.
///
/// Every cache of the process also shares one global budget (`processBudget`): a chain of
/// many compressed images, or many extents, cannot add up their budgets.
///
/// Clusters are spread over up to eight shards by key, each with its own lock, so parallel
/// readers of one image do not queue on a single mutex.
final class InflatedClusters: Sendable {
    private final class Shard: Sendable {
        let state = Mutex<(items: [UInt64: [UInt8]], order: [UInt64])>(([:], []))
    }
    private let shards: [Shard]
    /// Entries each shard may hold.
    private let capacity: Int
    private let clusterBytes: Int

    /// Bytes all caches of the process may hold together.
    static let processBudget = 64 << 20
    private static let processBytes = Atomic<Int>(0)
    /// What all caches hold now.
    static var heldBytes: Int { processBytes.load(ordering: .relaxed) }

    init(clusterBytes: Int, budget: Int = 8 << 20) {
        self.clusterBytes = clusterBytes
        let total = min(1024, max(2, budget / max(clusterBytes, 1)))
        let count = max(1, min(8, total / 8))
        shards = (0..<count).map { _ in Shard() }
        capacity = max(1, total / count)
    }

    deinit {
        let held = shards.reduce(0) { sum, shard in sum + shard.state.withLock { $0.items.values.reduce(0) { $0 + $1.count } } }
        Self.processBytes.subtract(held, ordering: .relaxed)
    }

    /// At least the first `need` bytes of the cluster at `key`; `inflate(limit)` must return
    /// at least the first `limit` bytes of the cluster (never more than the cluster).
    func cluster(at key: UInt64, need: Int, inflate: (_ limit: Int) throws -> [UInt8]) throws -> [UInt8] {
        // Keys are host offsets (cluster- or sector-aligned): mix the bits before picking.
        let shard = shards[Int((key &* 0x9E37_79B9_7F4A_7C15) >> 58) % shards.count]
        let cached = shard.state.withLock { $0.items[key] }
        if let cached, cached.count >= need { return cached }
        // Seen before, or most of it wanted: inflate it all.
        let limit = cached != nil || need > clusterBytes / 2 ? clusterBytes : need
        let bytes = try inflate(limit)
        let capacity = self.capacity
        shard.state.withLock { c in
            if c.items[key] == nil { c.order.append(key) }
            let old = c.items[key]?.count ?? 0
            if old < bytes.count {
                c.items[key] = bytes
                Self.processBytes.add(bytes.count - old, ordering: .relaxed)
            }
            // Over this shard's count or the process budget: drop the oldest first (under the
            // process budget even the newest goes: the caller still gets its bytes).
            while c.order.count > capacity || (!c.order.isEmpty && Self.processBytes.load(ordering: .relaxed) > Self.processBudget) {
                let gone = c.items.removeValue(forKey: c.order.removeFirst())?.count ?? 0
                Self.processBytes.subtract(gone, ordering: .relaxed)
            }
        }
        return bytes
    }
}
