import Synchronization

/// Recently inflated compressed clusters (VMDK streamOptimized grains, qcow2 deflate
/// clusters), keyed by host offset, so small reads in one cluster do not inflate it again
/// and again. Bounded to about `budget` bytes; the oldest entry goes first.
final class InflatedClusters: Sendable {
    private let state = Mutex<(items: [UInt64: [UInt8]], order: [UInt64])>(([:], []))
    private let capacity: Int

    init(clusterBytes: Int, budget: Int = 8 << 20) {
        capacity = min(1024, max(4, budget / max(clusterBytes, 1)))
    }

    /// The cluster at `key`, inflating it with `inflate` on a miss.
    func cluster(at key: UInt64, inflate: () throws -> [UInt8]) throws -> [UInt8] {
        if let hit = state.withLock({ $0.items[key] }) { return hit }
        let bytes = try inflate()
        state.withLock { c in
            guard c.items[key] == nil else { return }
            c.items[key] = bytes
            c.order.append(key)
            if c.order.count > capacity { c.items[c.order.removeFirst()] = nil }
        }
        return bytes
    }
}
