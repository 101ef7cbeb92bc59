import Synchronization

/// Metadata changed in memory that a write-back puts into the file: a `TableCache`, a table
/// a driver holds whole (qcow2's L1 and refcount table), or a whole `WriteBackChain`.
public protocol MetadataLayer: AnyObject, Sendable {
    var isDirty: Bool { get }
    /// Writes what changed (to the page cache; not durable by itself). The caller has made
    /// every layer it depends on durable first: layers in a chain are only written by it.
    func writeChanges() throws
}

/// The order a format's metadata reaches the disk, stated once as explicit dependencies
/// (QEMU's cache dependencies): each layer depends on every layer before it in the chain
/// (qcow2: refcounts, then the L2 tables naming the clusters they count, then the L1 naming
/// the L2 tables; VMDK: grain tables, then the directory), and a layer marked `afterData`
/// also on the guest data written before the write-back. A barrier (fdatasync) runs before
/// each layer written after the first (unless nothing was written since the last one) and
/// before a first layer marked `afterData`.
///
/// One pass at a time (`lock`). A table cache that depends on earlier layers writes itself
/// back only through the chain (`write(through:)`); the first layer depends on nothing and
/// may write itself back on its own (its copies guard against a concurrent pass, and a
/// cache relieving itself under its owner's lock must not wait for this one). Lookups
/// never take the lock, so no reader waits on the barriers it is held across.
public final class WriteBackChain: MetadataLayer {
    public struct Layer: Sendable {
        public let metadata: any MetadataLayer
        public let afterData: Bool
        public init(_ metadata: any MetadataLayer, afterData: Bool = false) {
            self.metadata = metadata
            self.afterData = afterData
        }
    }
    private let layers: [Layer]
    private let barrier: @Sendable () throws -> Void
    private let lock = Mutex<Void>(())

    /// Table caches among `layers` after the first are joined to the chain: their own
    /// write-backs (relief, flush) go through it. A first layer marked `afterData` that
    /// writes itself back needs its own barrier (`beforeWriteBack`).
    public init(_ layers: [Layer], barrier: @escaping @Sendable () throws -> Void) {
        self.layers = layers
        self.barrier = barrier
        for l in layers.dropFirst() { (l.metadata as? TableCache)?.join(self) }
    }

    public var isDirty: Bool { layers.contains { $0.metadata.isDirty } }

    /// Every layer that changed, in order, with the barriers between them (not durable after
    /// the last one: the caller syncs, or this chain is a layer of a longer one).
    public func writeChanges() throws {
        try lock.withLock { _ in try pass(upTo: layers.count, thenBarrierFor: nil) }
    }

    /// Writes every layer before `last` that changed, the barriers its dependencies need, then
    /// `last` itself: what a table cache in the chain runs to write itself back.
    public func write(through last: any MetadataLayer) throws {
        guard let k = layers.firstIndex(where: { $0.metadata === last }) else {
            preconditionFailure("a layer writes back through a chain it is not in")
        }
        try lock.withLock { _ in
            guard last.isDirty else { return }
            try pass(upTo: k, thenBarrierFor: k)
            try last.writeChanges()
        }
    }

    /// Every layer written, then a barrier: everything changed before the call is durable.
    public func flush() throws {
        try lock.withLock { _ in
            try pass(upTo: layers.count, thenBarrierFor: nil)
            try barrier()
        }
    }

    /// Writes the changed layers among the first `n`, a barrier before each one that needs
    /// it, and (when `next` is given) the barrier `next` needs before it is written. A layer
    /// after the first always has a barrier between it and anything written before it, in
    /// this pass or outside it (a layer's own write-back, a table the driver created).
    private func pass(upTo n: Int, thenBarrierFor next: Int?) throws {
        var pending = true  // something may have been written since the last barrier
        func barrierIfNeeded(_ i: Int) throws {
            guard pending, i > 0 || layers[i].afterData else { return }
            try barrier()
            pending = false
        }
        for (i, l) in layers.prefix(n).enumerated() where l.metadata.isDirty {
            try barrierIfNeeded(i)
            try l.metadata.writeChanges()
            pending = true
        }
        if let next { try barrierIfNeeded(next) }
    }
}
